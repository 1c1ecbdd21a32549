//! The daemon's side of the control plane (a child module of `daemon`, so it can
//! extend the core task): starting the control-plane task, publishing this node's
//! adverts periodically and on change, feeding verified adverts to the core, closing
//! data-plane links a new CRL revokes, and adding an advertised alternate parent when
//! the primary is gone.
//!
//! Like the rest of the daemon it must never decide where a case goes: the alternate
//! is handed to the core (`Node::handle_upstream_added`), which decides.

use super::{Core, DaemonError, Input, dial_parent};
use crate::config::{Config, ParentConfig};
use crate::control_plane::discovery::{Directory, choose_alternate};
use crate::control_plane::{self, ControlConfig, ControlPlaneHandle, FromControl};
use crate::view::now;
use certs::keys::NodeCredentials;
use certs::verify::{PeerIdentity, TrustStore};
use ed25519_dalek::SigningKey;
use federation_proto::{CapacityAdvert, Millis, ModalityCapacity, NodeClaim, NodeName};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tiers::Upstream;
use tokio::sync::mpsc;

/// The control plane as the core task sees it.
pub(super) struct ControlGlue {
    pub handle: ControlPlaneHandle,
    directory: Directory,
    me: PeerIdentity,
    endpoint: quinn::Endpoint,
    claim: NodeClaim,
    data_addr: Option<SocketAddr>,
    ttl_ms: u64,
    last_capacity: Option<Vec<ModalityCapacity>>,
    /// A configured parent's link went down and has not come back.
    parent_lost: bool,
    /// Alternates being dialled or added, and whether the core has them yet.
    alternates: BTreeMap<NodeName, (Upstream, bool)>,
}

/// Everything `start` needs from the daemon.
pub(super) struct GlueParts<'a> {
    pub control: &'a ControlConfig,
    pub config: &'a Config,
    pub key: &'a SigningKey,
    pub creds: &'a NodeCredentials,
    pub trust: Arc<TrustStore>,
    pub me: PeerIdentity,
    pub endpoint: quinn::Endpoint,
    pub claim: NodeClaim,
    pub data_addr: SocketAddr,
    pub tx: mpsc::Sender<Input>,
}

/// Starts the control plane and the tasks that connect it to the core task.
pub(super) async fn start(
    parts: GlueParts<'_>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<ControlGlue, DaemonError> {
    let mut crl_pems = Vec::new();
    for path in &parts.config.tls.crls {
        let pem =
            std::fs::read_to_string(path).map_err(|e| DaemonError::Credentials(format!("{}: {e}", path.display())))?;
        crl_pems.push(pem);
    }
    let (handle, mut events, task) =
        control_plane::start(parts.control, parts.key, &parts.creds.chain, parts.trust.clone(), crl_pems)
            .await
            .map_err(|e| DaemonError::Config(e.to_string()))?;
    background.push(task);
    let tx = parts.tx.clone();
    background.push(tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if tx.send(Input::Control(Box::new(event))).await.is_err() {
                break;
            }
        }
    }));
    let (tx, every) = (parts.tx.clone(), Duration::from_millis(parts.control.advert_interval_ms.max(100)));
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if tx.send(Input::AdvertTick).await.is_err() {
                break;
            }
        }
    }));
    background.push(tokio::spawn(watch_crl_files(parts.config.tls.crls.clone(), parts.tx.clone())));
    let data_addr = parts.control.data_addr.or((!parts.data_addr.ip().is_unspecified()).then_some(parts.data_addr));
    Ok(ControlGlue {
        handle,
        directory: Directory::default(),
        me: parts.me,
        endpoint: parts.endpoint,
        claim: parts.claim,
        data_addr,
        ttl_ms: parts.control.advert_ttl_ms,
        last_capacity: None,
        parent_lost: false,
        alternates: BTreeMap::new(),
    })
}

/// How often the CRL files named in `[tls] crls` are checked for a newer version.
pub(super) const CRL_FILE_POLL: Duration = Duration::from_secs(2);
/// Largest CRL file read, in bytes.
const CRL_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Watches the configured CRL files: when one changes (an operator dropped in the
/// CA's new CRL), it is loaded like an injected CRL, so it is gossiped from here.
async fn watch_crl_files(paths: Vec<std::path::PathBuf>, tx: mpsc::Sender<Input>) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Vec<Option<std::time::SystemTime>> = paths.iter().map(|p| modified(p)).collect();
    loop {
        tokio::time::sleep(CRL_FILE_POLL).await;
        for (path, last) in paths.iter().zip(seen.iter_mut()) {
            let now = modified(path);
            if now.is_none() || now == *last {
                continue;
            }
            *last = now;
            let too_big = std::fs::metadata(path).map(|m| m.len() > CRL_FILE_BYTES_MAX).unwrap_or(true);
            let pem = if too_big { None } else { std::fs::read_to_string(path).ok() };
            let Some(pem) = pem else {
                tracing::warn!(path = %path.display(), "CRL file changed but could not be read (or is over 4 MiB)");
                continue;
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            if tx.send(Input::LoadCrl(pem, reply)).await.is_err() {
                return;
            }
            match answer.await {
                Ok(Ok(issuer)) => tracing::info!(path = %path.display(), %issuer, "CRL file reloaded"),
                Ok(Err(e)) => tracing::warn!(path = %path.display(), "CRL file refused: {e}"),
                Err(_) => return,
            }
        }
    }
}

impl Core {
    /// Signs and gossips this node's current capacity.
    pub(super) fn publish_advert(&mut self, t: Millis) {
        let Some(glue) = &mut self.control else { return };
        match self.core.capacity_advert_for(t, glue.ttl_ms) {
            Ok(envelope) => glue.handle.publish_advert(envelope, glue.data_addr),
            Err(e) => tracing::warn!("advert not signed: {e}"),
        }
        glue.last_capacity = Some(self.core.capacity());
    }

    /// After every input: an advert goes out at once if capacity changed.
    pub(super) fn control_after_input(&mut self) {
        let Some(glue) = &self.control else { return };
        if glue.last_capacity.as_ref() != Some(&self.core.capacity()) {
            self.publish_advert(now());
        }
    }

    pub(super) async fn on_control(&mut self, t: Millis, event: FromControl) {
        match event {
            FromControl::Advert(v) => {
                if let Err(e) = self.core.handle_advert(t, &v.envelope) {
                    tracing::warn!(origin = %v.origin.name, "advert refused by the core: {e}");
                    return;
                }
                if let Some(glue) = &mut self.control {
                    glue.directory.record(&v);
                }
                self.maybe_add_alternate(t).await;
            }
            FromControl::Admitted(identity) => {
                let detail = format!("{} {}", identity.tier, identity.peer_id);
                let _ = self.store.audit(t, "control.admitted", None, Some(identity.name.as_str()), &detail).await;
            }
            FromControl::Refused { peer_id, reason } => {
                let _ = self.store.audit(t, "control.refused", None, Some(&peer_id), &reason).await;
            }
            FromControl::CrlLoaded { issuer } => {
                for (peer, e) in self.live.recheck(&self.trust) {
                    tracing::warn!(%peer, "data-plane link closed: {e}");
                    let _ = self.store.audit(t, "link.revoked", None, Some(peer.as_str()), &e.to_string()).await;
                }
                let _ = self.store.audit(t, "crl.loaded", None, None, &issuer).await;
            }
            FromControl::Revoked(identity) => {
                if let Some(glue) = &mut self.control {
                    glue.directory.forget(&identity.name);
                    glue.alternates.remove(&identity.name);
                }
                let _ = self.store.audit(t, "control.revoked", None, Some(identity.name.as_str()), "").await;
            }
        }
    }

    /// A CRL from the operator: into the trust store, gossiped, links re-checked.
    pub(super) async fn load_crl(&mut self, pem: String) -> Result<String, String> {
        match &self.control {
            Some(glue) => glue.handle.inject_crl(pem).await,
            None => {
                let info = self.trust.load_crl(&pem).map_err(|e| e.to_string())?;
                for (peer, e) in self.live.recheck(&self.trust) {
                    tracing::warn!(%peer, "data-plane link closed: {e}");
                }
                Ok(info.issuer)
            }
        }
    }

    pub(super) fn known_adverts(&self, t: Millis) -> Vec<CapacityAdvert> {
        self.core.known_adverts(t).cloned().collect()
    }

    fn is_parent(&self, name: &NodeName) -> bool {
        self.config.parents.iter().any(|p| p.name == name.as_str())
    }

    pub(super) fn control_peer_up(&mut self, t: Millis, name: &NodeName) {
        let is_parent = self.is_parent(name);
        let Some(glue) = &mut self.control else { return };
        if is_parent {
            glue.parent_lost = false;
        }
        if let Some((upstream, added)) = glue.alternates.get_mut(name)
            && !*added
        {
            *added = true;
            let upstream = upstream.clone();
            tracing::info!(alternate = %name, "alternate parent linked; offering it to the core");
            self.core.handle_upstream_added(t, upstream);
        }
    }

    pub(super) async fn control_peer_down(&mut self, t: Millis, name: &NodeName) {
        if self.is_parent(name)
            && let Some(glue) = &mut self.control
        {
            glue.parent_lost = true;
            self.maybe_add_alternate(t).await;
        }
    }

    /// With the parent gone and no alternate yet: dial the best advertised one.
    async fn maybe_add_alternate(&mut self, t: Millis) {
        let exclude: Vec<NodeName> = self.config.parents.iter().map(|p| NodeName::new(p.name.as_str())).collect();
        let Some(glue) = &mut self.control else { return };
        if !glue.parent_lost || !glue.alternates.is_empty() {
            return;
        }
        let Some(entry) = choose_alternate(&glue.me, &glue.directory, &exclude, t) else {
            tracing::debug!("parent unreachable and no advertised alternate yet");
            return;
        };
        let Some(addr) = entry.data_addr else { return };
        let name = entry.identity.name.clone();
        let upstream =
            Upstream { name: name.clone(), tier: entry.identity.tier, public_key: Some(entry.identity.public_key) };
        glue.alternates.insert(name.clone(), (upstream, false));
        let parent = ParentConfig { name: name.to_string(), tier: entry.identity.tier, addr };
        let (endpoint, claim) = (glue.endpoint.clone(), glue.claim.clone());
        tracing::info!(alternate = %name, %addr, "parent unreachable: dialling an advertised alternate");
        let _ = self.store.audit(t, "control.alternate", None, Some(name.as_str()), &addr.to_string()).await;
        tokio::spawn(dial_parent(endpoint, parent, claim, self.trust.clone(), self.tx.clone()));
    }
}
