//! Verification: who is this peer, and may it claim what its certificate says?
//!
//! [`TrustStore`] holds the federation root and the loaded CRLs (replaceable at
//! runtime). [`TrustStore::identity_from_chain`] is the one complete check every link
//! uses; the rustls verifiers in [`FederationVerifier`] call it for both ends of a
//! connection. It checks, in order:
//!
//! 1. **chain**: the certificate chains to the federation root, every signature is
//!    Ed25519 and verifies (webpki path building);
//! 2. **validity**: every certificate, the root included, is valid at `now`;
//! 3. **revocation**: no certificate in the chain is on a loaded CRL (webpki's CRL
//!    checking, whole chain, see [`RevocationPolicy`]);
//! 4. **region**: X.509 name constraints of every CA above the node (webpki);
//! 5. **tier**: the node has a tier claim, every CA in the chain has one (the root may
//!    omit it: unlimited), and every claim is strictly below its issuer's;
//! 6. **profile**: one valid node name, an Ed25519 key, serverAuth and clientAuth.
//!
//! The result is a [`PeerIdentity`]: the name, tier, region, key and libp2p PeerId the
//! caller may rely on. [`check_parent_link`] adds the parent/child rule of the
//! hierarchy on top.
//!
//! This module must never accept a certificate on a partial check: every public entry
//! point runs all of the above, and none of them panics on malformed input.

mod crl;
mod tls;

pub use crl::CrlInfo;
pub use tls::FederationVerifier;

use crate::keys;
use crate::profile::{self, CertSummary, MalformedError, Serial};
use federation_proto::{NodeName, PublicKey, Tier};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::sync::{Arc, Mutex, RwLock};

/// Most intermediates accepted in a presented chain (the hierarchy has seven tiers).
pub const INTERMEDIATES_MAX: usize = 8;

/// Why a certificate, chain, CRL or link was refused. Grouped by cause; each message
/// says what was refused and why. See [`VerifyError::cause`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    // --- untrusted chain -------------------------------------------------------
    /// No valid chain to the federation root (another federation, a self-signed
    /// certificate, a missing intermediate, a bad signature, a path constraint).
    #[error("certificate `{subject}` is not trusted: {reason}")]
    UntrustedChain { subject: String, reason: String },

    // --- validity --------------------------------------------------------------
    #[error("certificate `{subject}` expired at {not_after} (now {now})")]
    Expired { subject: String, not_after: String, now: String },
    #[error("certificate `{subject}` is not valid before {not_before} (now {now}); is a clock wrong?")]
    NotYetValid { subject: String, not_before: String, now: String },

    // --- revocation ------------------------------------------------------------
    #[error("certificate `{subject}` has been revoked by its CA (on a loaded CRL)")]
    Revoked { subject: String },
    #[error("revocation status of `{subject}` cannot be established: {reason}")]
    RevocationUnknown { subject: String, reason: String },

    // --- region ----------------------------------------------------------------
    #[error("`{name}` is outside region `{region}`: {reason}")]
    OutsideRegion { name: String, region: String, reason: String },

    // --- tier ------------------------------------------------------------------
    #[error("tier {tier} of `{subject}` is not permitted: {reason}")]
    TierNotPermitted { subject: String, tier: Tier, reason: String },
    #[error(
        "certificate `{subject}` carries no tier claim (extension {}): every node and intermediate CA certificate must",
        profile::TIER_EXTENSION_OID
    )]
    MissingTierClaim { subject: String },

    // --- malformed -------------------------------------------------------------
    /// The certificate cannot be parsed or breaks the federation profile.
    #[error("malformed: {0}")]
    Malformed(#[from] MalformedError),

    // --- peer identity ---------------------------------------------------------
    /// A valid certificate, but not the peer that was dialled / expected.
    #[error("expected peer `{expected}` but its certificate names `{presented}`")]
    WrongPeer { expected: String, presented: String },

    // --- CRLs ------------------------------------------------------------------
    #[error("CRL refused: {reason}")]
    InvalidCrl { reason: String },
    #[error("CRL from `{issuer}` refused: its signature does not verify with the issuer's key")]
    CrlBadSignature { issuer: String },
    #[error("CRL from `{issuer}` refused: its issuer is not known to chain to the federation root ({reason})")]
    UnknownCrlIssuer { issuer: String, reason: String },
    #[error("CRL from `{issuer}` refused: CRL number {offered} is older than the loaded {loaded}")]
    StaleCrl { issuer: String, loaded: String, offered: String },

    // --- trust store -----------------------------------------------------------
    #[error("federation root refused: {reason}")]
    InvalidRoot { reason: String },
}

/// The cause groups of [`VerifyError`], for metrics and for mapping to wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VerifyCause {
    UntrustedChain,
    Validity,
    Revocation,
    Region,
    Tier,
    Malformed,
    WrongPeer,
    Crl,
    Configuration,
}

impl VerifyError {
    pub fn cause(&self) -> VerifyCause {
        use VerifyError as E;
        match self {
            E::UntrustedChain { .. } => VerifyCause::UntrustedChain,
            E::Expired { .. } | E::NotYetValid { .. } => VerifyCause::Validity,
            E::Revoked { .. } | E::RevocationUnknown { .. } => VerifyCause::Revocation,
            E::OutsideRegion { .. } => VerifyCause::Region,
            E::TierNotPermitted { .. } | E::MissingTierClaim { .. } => VerifyCause::Tier,
            E::Malformed(_) => VerifyCause::Malformed,
            E::WrongPeer { .. } => VerifyCause::WrongPeer,
            E::InvalidCrl { .. } | E::CrlBadSignature { .. } | E::UnknownCrlIssuer { .. } | E::StaleCrl { .. } => {
                VerifyCause::Crl
            }
            E::InvalidRoot { .. } => VerifyCause::Configuration,
        }
    }

    /// The [`VerifyError`] inside a rustls error produced by [`FederationVerifier`],
    /// if there is one (tier, region and profile errors travel this way; standard
    /// causes such as expiry map to rustls' own variants).
    pub fn from_rustls(err: &rustls::Error) -> Option<&VerifyError> {
        match err {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<VerifyError>()
            }
            _ => None,
        }
    }
}

/// What a verified certificate says about its holder: everything here has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node's hierarchical name.
    pub name: NodeName,
    /// The node's tier, checked against every issuer in its chain.
    pub tier: Tier,
    /// The region the node lives in: its name without the first label
    /// (see [`profile::region_of`]).
    pub region: String,
    /// The node's Ed25519 key (TLS, message signatures, libp2p).
    pub public_key: PublicKey,
    /// The libp2p PeerId (base58) derived from `public_key`.
    pub peer_id: String,
    /// The certificate's serial number.
    pub serial: Serial,
    /// The certificate's issuer, RFC 4514 style.
    pub issuer: String,
    /// The certificate's notAfter.
    pub not_after: UnixTime,
}

impl PeerIdentity {
    /// Whether a libp2p PeerId (base58) is this node's.
    pub fn matches_peer_id(&self, peer_id: &str) -> bool {
        self.peer_id == peer_id
    }
}

/// Checks a parent/child link of the hierarchy from the parent's (`me`) side: the
/// child must be of a lower tier, and lie inside the parent's region (its name ends in
/// the parent's region) unless its name is in `cross_links`, the explicitly configured
/// exceptions (e.g. an alternate parent across a regional boundary). The tier rule has
/// no exception.
pub fn check_parent_link(me: &PeerIdentity, child: &PeerIdentity, cross_links: &[NodeName]) -> Result<(), VerifyError> {
    if child.tier >= me.tier {
        return Err(VerifyError::TierNotPermitted {
            subject: child.name.to_string(),
            tier: child.tier,
            reason: format!("a child link must come from a lower tier than this node `{}` ({})", me.name, me.tier),
        });
    }
    if !child.name.is_within(&me.region) && !cross_links.contains(&child.name) {
        return Err(VerifyError::OutsideRegion {
            name: child.name.to_string(),
            region: me.region.clone(),
            reason: format!("a child of `{}` must lie in its region unless configured as a cross-link", me.name),
        });
    }
    Ok(())
}

/// How revocation is checked. webpki's CRL checking is used for the whole chain
/// (node and intermediates) with the CRLs loaded in the [`TrustStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RevocationPolicy {
    /// Refuse a certificate whose issuer has no loaded CRL. Default `false`: such a
    /// certificate is accepted (a fresh node may not have every CA's CRL yet).
    pub require_crl: bool,
    /// Refuse certificates checked against a CRL whose nextUpdate has passed.
    /// Default `false`: an old CRL still revokes what it lists (nodes on flaky
    /// links must keep working), but never un-revokes anything.
    pub enforce_next_update: bool,
}

/// The federation root, the loaded CRLs and the CAs that issued them.
#[derive(Debug)]
pub struct TrustStore {
    root: CertificateDer<'static>,
    root_summary: CertSummary,
    anchor: TrustAnchor<'static>,
    policy: RevocationPolicy,
    state: RwLock<Arc<crl::CrlState>>,
    /// Serialises CRL updates (read-modify-swap of `state`).
    update: Mutex<()>,
}

impl TrustStore {
    /// A trust store for the federation root in `root_pem` (the first certificate),
    /// with no CRLs and the default [`RevocationPolicy`].
    pub fn from_root_pem(root_pem: &str) -> Result<TrustStore, VerifyError> {
        let root = profile::pem_certificates(root_pem)
            .map_err(|e| VerifyError::InvalidRoot { reason: e.to_string() })?
            .remove(0);
        Self::from_root_der(root)
    }

    /// As [`TrustStore::from_root_pem`], from DER. The root must be a self-signed
    /// Ed25519 CA certificate.
    pub fn from_root_der(root: CertificateDer<'static>) -> Result<TrustStore, VerifyError> {
        let invalid = |reason: String| VerifyError::InvalidRoot { reason };
        let root_summary = CertSummary::from_der(&root).map_err(|e| invalid(e.to_string()))?;
        if !root_summary.is_ca {
            return Err(invalid(format!("`{}` is not a CA certificate", root_summary.subject)));
        }
        if root_summary.public_key.is_none() {
            return Err(invalid("the root key is not Ed25519".into()));
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&root).map_err(|e| invalid(format!("unparseable: {e}")))?;
        if !root_summary.self_issued || parsed.verify_signature(None).is_err() {
            return Err(invalid(format!("`{}` is not self-signed", root_summary.subject)));
        }
        let anchor = webpki::anchor_from_trusted_cert(&root)
            .map_err(|e| invalid(format!("not usable as a trust anchor: {e}")))?
            .to_owned();
        Ok(TrustStore {
            root,
            root_summary,
            anchor,
            policy: RevocationPolicy::default(),
            state: RwLock::new(Arc::new(crl::CrlState::default())),
            update: Mutex::new(()),
        })
    }

    /// Sets the revocation policy.
    pub fn with_policy(mut self, policy: RevocationPolicy) -> TrustStore {
        self.policy = policy;
        self
    }

    /// The federation root certificate.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// What the root certificate says.
    pub fn root_summary(&self) -> &CertSummary {
        &self.root_summary
    }

    pub fn policy(&self) -> RevocationPolicy {
        self.policy
    }

    pub(crate) fn anchor(&self) -> &TrustAnchor<'static> {
        &self.anchor
    }

    /// The CRLs currently loaded.
    pub fn crls(&self) -> Vec<CrlInfo> {
        self.snapshot().crls.iter().map(|c| c.info.clone()).collect()
    }

    fn snapshot(&self) -> Arc<crl::CrlState> {
        match self.state.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn swap(&self, state: crl::CrlState) {
        match self.state.write() {
            Ok(mut guard) => *guard = Arc::new(state),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(state),
        }
    }

    /// Verifies a peer's chain as rustls presents it — `certs[0]` the end entity, the
    /// rest intermediates — at the current system time. For use after a handshake
    /// (`peer_certificates()` / quinn's `peer_identity()`).
    pub fn identity_of_peer(&self, certs: &[CertificateDer<'_>]) -> Result<PeerIdentity, VerifyError> {
        let (end_entity, intermediates) = certs.split_first().ok_or_else(|| VerifyError::UntrustedChain {
            subject: "(none)".into(),
            reason: "the peer presented no certificate".into(),
        })?;
        self.identity_from_chain(end_entity, intermediates, UnixTime::now())
    }

    /// The complete check (see the module docs) of `end_entity` with the presented
    /// `intermediates` at time `now`. Returns the verified identity.
    pub fn identity_from_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<PeerIdentity, VerifyError> {
        // Read the claims first (no trust yet), so every error can name a certificate.
        let leaf = CertSummary::from_der(end_entity)?;
        if intermediates.len() > INTERMEDIATES_MAX {
            return Err(VerifyError::UntrustedChain {
                subject: leaf.label(),
                reason: format!(
                    "{} intermediates presented, at most {INTERMEDIATES_MAX} accepted",
                    intermediates.len()
                ),
            });
        }
        let presented = intermediates.iter().map(|c| CertSummary::from_der(c)).collect::<Result<Vec<_>, _>>()?;
        let now_s = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);

        // webpki does not check a trust anchor's validity: do it here.
        if now_s > self.root_summary.not_after_s {
            return Err(VerifyError::Expired {
                subject: self.root_summary.label(),
                not_after: profile::format_time_s(self.root_summary.not_after_s),
                now: profile::format_time_s(now_s),
            });
        }
        if now_s < self.root_summary.not_before_s {
            return Err(VerifyError::NotYetValid {
                subject: self.root_summary.label(),
                not_before: profile::format_time_s(self.root_summary.not_before_s),
                now: profile::format_time_s(now_s),
            });
        }

        // Chain, signatures, validity, name constraints, EKU, revocation: webpki.
        let state = self.snapshot();
        if self.policy.require_crl && state.crls.is_empty() {
            return Err(VerifyError::RevocationUnknown {
                subject: leaf.label(),
                reason: "no CRL is loaded and the policy requires one".into(),
            });
        }
        let crl_refs: Vec<&webpki::CertRevocationList<'static>> = state.crls.iter().map(|c| &c.crl).collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs).ok().map(|builder| {
            builder
                .with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(if self.policy.require_crl {
                    webpki::UnknownStatusPolicy::Deny
                } else {
                    webpki::UnknownStatusPolicy::Allow
                })
                .with_expiration_policy(if self.policy.enforce_next_update {
                    webpki::ExpirationPolicy::Enforce
                } else {
                    webpki::ExpirationPolicy::Ignore
                })
                .build()
        });
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| self.webpki_error(e, &leaf, &presented, &state, now_s))?;
        let anchors = std::slice::from_ref(&self.anchor);
        let path = ee
            .verify_for_usage(
                tls::ED25519_ONLY.all,
                anchors,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                revocation,
                None,
            )
            .map_err(|e| self.webpki_error(e, &leaf, &presented, &state, now_s))?;

        // Tier: every claim strictly below its issuer's, up to the root.
        let issuers =
            path.intermediate_certificates().map(|c| CertSummary::from_der(&c.der())).collect::<Result<Vec<_>, _>>()?;
        let tier = leaf.tier.ok_or_else(|| VerifyError::MissingTierClaim { subject: leaf.label() })?;
        let (mut child_label, mut child_tier) = (leaf.label(), tier);
        for ca in &issuers {
            let ca_tier = ca.tier.ok_or_else(|| VerifyError::MissingTierClaim { subject: ca.label() })?;
            check_tier_below(&child_label, child_tier, &ca.label(), ca_tier)?;
            (child_label, child_tier) = (ca.label(), ca_tier);
        }
        if let Some(root_tier) = self.root_summary.tier {
            check_tier_below(&child_label, child_tier, &self.root_summary.label(), root_tier)?;
        }

        // Profile of the node certificate.
        let malformed = |reason: &str| MalformedError::new(format!("node certificate `{}`", leaf.label()), reason);
        let name = match leaf.dns_names.as_slice() {
            [one] => profile::parse_node_name(one).map_err(|e| malformed(&e.to_string()))?,
            [] => return Err(malformed("it names no node (no subjectAltName dNSName)").into()),
            _ => return Err(malformed("it names more than one node (several dNSNames)").into()),
        };
        if let Some(cn) = leaf.common_name.as_deref().filter(|cn| *cn != name.as_str()) {
            return Err(malformed(&format!("common name `{cn}` differs from its dNSName")).into());
        }
        if !leaf.eku_client_auth {
            return Err(malformed("it lacks the clientAuth extended key usage").into());
        }
        let public_key = leaf.public_key.ok_or_else(|| malformed("its key is not Ed25519"))?;
        let peer_id = keys::peer_id_of(&public_key)?;
        let not_after = u64::try_from(leaf.not_after_s)
            .map(|s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(s)))
            .map_err(|_| malformed("notAfter before 1970"))?;
        Ok(PeerIdentity {
            region: profile::region_of(&name).to_owned(),
            name,
            tier,
            public_key,
            peer_id,
            serial: leaf.serial,
            issuer: leaf.issuer,
            not_after,
        })
    }

    /// Turns a webpki error into a [`VerifyError`] naming the certificate at fault.
    fn webpki_error(
        &self,
        err: webpki::Error,
        leaf: &CertSummary,
        presented: &[CertSummary],
        state: &crl::CrlState,
        now_s: i64,
    ) -> VerifyError {
        use webpki::Error as W;
        let chain = || std::iter::once(leaf).chain(presented.iter());
        let subject = leaf.label();
        match err {
            W::CertExpired { not_after, .. } => {
                let not_after_s = i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX);
                let who = chain().find(|c| c.not_after_s == not_after_s).map_or(subject, |c| c.label());
                VerifyError::Expired {
                    subject: who,
                    not_after: profile::format_time_s(not_after_s),
                    now: profile::format_time_s(now_s),
                }
            }
            W::CertNotValidYet { not_before, .. } => {
                let not_before_s = i64::try_from(not_before.as_secs()).unwrap_or(i64::MAX);
                let who = chain().find(|c| c.not_before_s == not_before_s).map_or(subject, |c| c.label());
                VerifyError::NotYetValid {
                    subject: who,
                    not_before: profile::format_time_s(not_before_s),
                    now: profile::format_time_s(now_s),
                }
            }
            W::CertRevoked => {
                let who = chain()
                    .find(|c| state.lists(&c.issuer_der, &c.serial))
                    .map_or_else(|| format!("{subject} (or a CA above it)"), |c| c.label());
                VerifyError::Revoked { subject: who }
            }
            W::UnknownRevocationStatus => VerifyError::RevocationUnknown {
                subject,
                reason: "no CRL from its issuer is loaded and the policy requires one".into(),
            },
            W::CrlExpired { next_update, .. } => VerifyError::RevocationUnknown {
                subject,
                reason: format!(
                    "its issuer's CRL was due for replacement at {} and the policy enforces nextUpdate",
                    profile::format_time_s(i64::try_from(next_update.as_secs()).unwrap_or(i64::MAX))
                ),
            },
            W::NameConstraintViolation => {
                let (region, ca) = chain()
                    .skip(1)
                    .chain(std::iter::once(&self.root_summary))
                    .find(|ca| {
                        !ca.permitted_dns.is_empty()
                            && !leaf
                                .dns_names
                                .iter()
                                .all(|n| ca.permitted_dns.iter().any(|p| NodeName::new(n.as_str()).is_within(p)))
                    })
                    .map_or_else(
                        || ("(a CA's region)".to_owned(), "a CA in its chain".to_owned()),
                        |ca| (ca.permitted_dns.join(", "), format!("CA `{}`", ca.label())),
                    );
                VerifyError::OutsideRegion {
                    name: subject,
                    region,
                    reason: format!("{ca} may only certify names in its region (X.509 name constraints)"),
                }
            }
            W::UnknownIssuer => VerifyError::UntrustedChain {
                subject,
                reason: format!(
                    "no chain to the federation root `{}`: issuer `{}` is neither the root nor a presented intermediate (another federation, a self-signed certificate, or a missing intermediate)",
                    self.root_summary.label(),
                    leaf.issuer
                ),
            },
            W::InvalidSignatureForPublicKey => VerifyError::UntrustedChain {
                subject,
                reason: "a signature in its chain does not verify (forged or altered certificate)".into(),
            },
            W::CaUsedAsEndEntity => VerifyError::UntrustedChain {
                subject,
                reason: "it is a CA certificate, presented as a node certificate".into(),
            },
            e @ (W::BadDer
            | W::BadDerTime
            | W::TrailingData(_)
            | W::ExtensionValueInvalid
            | W::MalformedExtensions
            | W::MalformedDnsIdentifier
            | W::MalformedNameConstraint
            | W::InvalidSerialNumber
            | W::InvalidCertValidity
            | W::UnsupportedCertVersion
            | W::UnsupportedCriticalExtension) => VerifyError::Malformed(MalformedError::new(
                format!("certificate `{subject}` or its chain"),
                e.to_string(),
            )),
            e => VerifyError::UntrustedChain { subject, reason: e.to_string() },
        }
    }
}

fn check_tier_below(subject: &str, tier: Tier, issuer: &str, issuer_tier: Tier) -> Result<(), VerifyError> {
    if tier < issuer_tier {
        return Ok(());
    }
    Err(VerifyError::TierNotPermitted {
        subject: subject.to_owned(),
        tier,
        reason: format!("its issuer `{issuer}` is {issuer_tier} and may only certify tiers below {issuer_tier}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str, tier: Tier) -> PeerIdentity {
        let name = NodeName::from(name);
        PeerIdentity {
            region: profile::region_of(&name).to_owned(),
            name,
            tier,
            public_key: PublicKey([7; 32]),
            peer_id: String::new(),
            serial: "01".parse().unwrap(),
            issuer: String::new(),
            not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(0)),
        }
    }

    #[test]
    fn parent_link_needs_a_lower_tier_inside_the_region() {
        let county = identity("dengfeng.zhengzhou.henan.cn", Tier::County);
        let township = identity("gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Township);
        assert!(check_parent_link(&county, &township, &[]).is_ok());

        let peer_county = identity("xinmi.zhengzhou.henan.cn", Tier::County);
        assert!(matches!(check_parent_link(&county, &peer_county, &[]), Err(VerifyError::TierNotPermitted { .. })));

        let elsewhere = identity("x.wuhan.hubei.cn", Tier::Township);
        assert!(matches!(check_parent_link(&county, &elsewhere, &[]), Err(VerifyError::OutsideRegion { .. })));
        assert!(check_parent_link(&county, &elsewhere, &[NodeName::from("x.wuhan.hubei.cn")]).is_ok());

        // A cross-link never lifts the tier rule.
        let higher = identity("wuhan.hubei.cn", Tier::City);
        assert!(check_parent_link(&county, &higher, &[NodeName::from("wuhan.hubei.cn")]).is_err());
    }

    #[test]
    fn errors_report_their_cause_group() {
        let e = VerifyError::MissingTierClaim { subject: "x".into() };
        assert_eq!(e.cause(), VerifyCause::Tier);
        assert!(e.to_string().contains(profile::TIER_EXTENSION_OID));
    }
}
