//! Loading certificate revocation lists into a [`TrustStore`].
//!
//! A CRL is accepted only if its signature verifies with the key of its issuer, and
//! that issuer is the federation root or a CA that chains to it. A CRL file written by
//! `telemed-ca crl` carries the issuing CA's chain after the CRL, so a node that knows
//! only the root can authenticate an intermediate's CRL; CAs authenticated this way are
//! remembered, so later CRLs from them may come alone.
//!
//! A CRL never replaces a newer one from the same issuer (CRL numbers only go up), so
//! replaying an old CRL cannot un-revoke a certificate.
//!
//! Revocation itself is checked by webpki during path building (see
//! [`super::RevocationPolicy`]); this module must never let an unauthenticated CRL into
//! the set webpki sees.

use super::{INTERMEDIATES_MAX, TrustStore, VerifyError};
use crate::profile::{self, Serial};
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// What a loaded CRL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The issuing CA, RFC 4514 style.
    pub issuer: String,
    /// The CRL number (RFC 5280 §5.2.3), if present.
    pub crl_number: Option<Serial>,
    pub this_update: UnixTime,
    pub next_update: UnixTime,
    /// Serials it revokes.
    pub revoked: Vec<Serial>,
}

/// The CRL set webpki checks against, and the CAs authenticated on the way.
/// Replaced as a whole (copy on write) behind the trust store's lock.
#[derive(Debug, Default, Clone)]
pub(super) struct CrlState {
    pub(super) crls: Vec<Arc<LoadedCrl>>,
    pub(super) known_cas: Vec<CertificateDer<'static>>,
}

#[derive(Debug)]
pub(super) struct LoadedCrl {
    pub(super) crl: webpki::CertRevocationList<'static>,
    pub(super) issuer_der: Vec<u8>,
    pub(super) info: CrlInfo,
}

impl CrlState {
    /// Whether a loaded CRL from `issuer_der` lists `serial`.
    pub(super) fn lists(&self, issuer_der: &[u8], serial: &Serial) -> bool {
        self.crls.iter().any(|c| c.issuer_der == issuer_der && c.info.revoked.contains(serial))
    }
}

fn numeric_cmp(a: &Serial, b: &Serial) -> Ordering {
    a.as_bytes().len().cmp(&b.as_bytes().len()).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

fn unix(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn invalid(reason: impl Into<String>) -> VerifyError {
    VerifyError::InvalidCrl { reason: reason.into() }
}

impl TrustStore {
    /// Loads (adds, or replaces the older CRL of the same issuer) a PEM CRL, checked at
    /// the current system time. See [`TrustStore::load_crl_at`].
    pub fn load_crl(&self, pem: &str) -> Result<CrlInfo, VerifyError> {
        self.load_crl_at(pem, UnixTime::now())
    }

    /// Loads a PEM CRL: one `X509 CRL` section, optionally followed by the issuing
    /// CA's chain (`CERTIFICATE` sections, root not needed). The CRL's signature must
    /// verify with its issuer's key, and the issuer must be the root or chain to it at
    /// `now`. Refuses a CRL older (lower CRL number) than the one loaded for the same
    /// issuer. Takes effect for every verification that starts afterwards.
    pub fn load_crl_at(&self, pem: &str, now: UnixTime) -> Result<CrlInfo, VerifyError> {
        let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot();
        let (loaded, new_cas) = self.prepare_crl(pem, &current, now)?;
        let mut next = (*current).clone();
        install(&mut next, &current, loaded.clone(), new_cas)?;
        self.swap(next);
        Ok(loaded.info.clone())
    }

    /// Replaces the whole CRL set at once (all or nothing), e.g. after re-fetching every
    /// CA's CRL. Issuers absent from `pems` lose their CRL. Each CRL is checked as in
    /// [`TrustStore::load_crl_at`], including against rollback.
    pub fn replace_crls_at(&self, pems: &[&str], now: UnixTime) -> Result<Vec<CrlInfo>, VerifyError> {
        let _update = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot();
        let mut next = crl_state_with_cas(&current);
        let mut infos = Vec::with_capacity(pems.len());
        for pem in pems {
            let (loaded, new_cas) = self.prepare_crl(pem, &next, now)?;
            infos.push(loaded.info.clone());
            install(&mut next, &current, loaded, new_cas)?;
        }
        self.swap(next);
        Ok(infos)
    }

    /// [`TrustStore::replace_crls_at`] at the current system time.
    pub fn replace_crls(&self, pems: &[&str]) -> Result<Vec<CrlInfo>, VerifyError> {
        self.replace_crls_at(pems, UnixTime::now())
    }

    /// Parses and authenticates a CRL without installing it.
    fn prepare_crl(
        &self,
        pem: &str,
        state: &CrlState,
        now: UnixTime,
    ) -> Result<(Arc<LoadedCrl>, Vec<CertificateDer<'static>>), VerifyError> {
        let mut crl_der = None;
        let mut bundle = Vec::new();
        for (kind, der) in profile::pem_sections(pem).map_err(|e| invalid(e.to_string()))? {
            match kind {
                SectionKind::Crl if crl_der.is_none() => crl_der = Some(der),
                SectionKind::Crl => return Err(invalid("more than one X509 CRL section")),
                SectionKind::Certificate => bundle.push(CertificateDer::from(der)),
                other => return Err(invalid(format!("unexpected PEM section {other:?}"))),
            }
        }
        let crl_der = crl_der.ok_or_else(|| invalid("no X509 CRL section"))?;
        if bundle.len() > INTERMEDIATES_MAX {
            return Err(invalid("too many certificates after the CRL"));
        }
        let (rest, crl) =
            CertificateRevocationList::from_der(&crl_der).map_err(|e| invalid(format!("not a valid DER CRL: {e}")))?;
        if !rest.is_empty() {
            return Err(invalid("trailing bytes after the CRL"));
        }
        let issuer = crl.issuer().to_string();
        if crl.signature_algorithm.algorithm.to_id_string() != profile::ED25519_OID {
            return Err(invalid(format!("CRL from `{issuer}` is not signed with Ed25519")));
        }
        let issuer_der = crl.issuer().as_raw().to_vec();
        let now_s = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);

        // Candidate issuers: the root, CAs authenticated before, certificates in the file.
        let mut candidates: Vec<(&CertificateDer<'_>, bool)> = Vec::new();
        if issuer_der == self.root_summary.subject_der {
            candidates.push((&self.root, false));
        }
        let subject_is = |c: &CertificateDer<'_>| {
            x509_parser::parse_x509_certificate(c).is_ok_and(|(_, x)| x.subject().as_raw() == issuer_der)
        };
        candidates.extend(state.known_cas.iter().filter(|c| subject_is(c)).map(|c| (c, false)));
        candidates.extend(bundle.iter().filter(|c| subject_is(c)).map(|c| (c, true)));
        if candidates.is_empty() {
            return Err(VerifyError::UnknownCrlIssuer {
                issuer,
                reason: "it is not the root, not a CA seen before, and the file carries no certificate for it".into(),
            });
        }

        let mut not_authenticated = None;
        let mut new_cas = Vec::new();
        let mut found = false;
        for (candidate, needs_chain) in candidates {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(candidate) else {
                continue;
            };
            if crl.verify_signature(cert.public_key()).is_err() {
                continue;
            }
            if cert.key_usage().is_ok_and(|ku| ku.is_some_and(|ku| !ku.value.crl_sign())) {
                return Err(invalid(format!("`{issuer}` may not sign CRLs (no cRLSign key usage)")));
            }
            if needs_chain {
                match self.authenticate_ca(candidate, &bundle, state, now_s) {
                    Ok(chain) => new_cas = chain,
                    Err(reason) => {
                        not_authenticated = Some(reason);
                        continue;
                    }
                }
            }
            found = true;
            break;
        }
        if !found {
            return Err(match not_authenticated {
                Some(reason) => VerifyError::UnknownCrlIssuer { issuer, reason },
                None => VerifyError::CrlBadSignature { issuer },
            });
        }

        let owned = webpki::OwnedCertRevocationList::from_der(&crl_der)
            .map_err(|e| invalid(format!("CRL from `{issuer}` is not usable: {e}")))?;
        let next_update = crl.next_update().ok_or_else(|| invalid(format!("CRL from `{issuer}` has no nextUpdate")))?;
        let info = CrlInfo {
            crl_number: crl.crl_number().map(|n| Serial::from_der_integer(&n.to_bytes_be())),
            this_update: unix(crl.last_update().timestamp()),
            next_update: unix(next_update.timestamp()),
            revoked: crl.iter_revoked_certificates().map(|r| Serial::from_der_integer(r.raw_serial())).collect(),
            issuer,
        };
        Ok((Arc::new(LoadedCrl { crl: owned.into(), issuer_der, info }), new_cas))
    }

    /// Checks that `ca` is a CA certificate valid at `now_s` that chains to the root,
    /// through CAs known before or certificates in `bundle`. Returns the CAs it
    /// authenticated (`ca` first). Revocation of these CAs is not checked here; it is
    /// checked for every chain that uses them.
    fn authenticate_ca(
        &self,
        ca: &CertificateDer<'_>,
        bundle: &[CertificateDer<'_>],
        state: &CrlState,
        now_s: i64,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let signed_by = |child: &X509Certificate<'_>, issuer_der: &[u8]| {
            X509Certificate::from_der(issuer_der).is_ok_and(|(_, issuer)| {
                issuer.subject().as_raw() == child.issuer().as_raw()
                    && child.verify_signature(Some(issuer.public_key())).is_ok()
            })
        };
        let mut chain = Vec::new();
        let mut current: CertificateDer<'static> = ca.clone().into_owned();
        for _ in 0..=INTERMEDIATES_MAX {
            let next = {
                let (_, cert) =
                    X509Certificate::from_der(&current).map_err(|e| format!("unparseable CA certificate: {e}"))?;
                let label = cert.subject().to_string();
                if !cert.is_ca() {
                    return Err(format!("`{label}` is not a CA certificate"));
                }
                let validity = cert.validity();
                if now_s < validity.not_before.timestamp() || now_s > validity.not_after.timestamp() {
                    return Err(format!("`{label}` is not valid now"));
                }
                chain.push(current.clone());
                if signed_by(&cert, &self.root) {
                    return Ok(chain);
                }
                if state.known_cas.iter().any(|k| signed_by(&cert, k)) {
                    return Ok(chain);
                }
                let parent = bundle
                    .iter()
                    .find(|c| **c != current && signed_by(&cert, c))
                    .ok_or_else(|| format!("no certificate of the file or of the root signed `{label}`"))?;
                parent.clone().into_owned()
            };
            current = next;
        }
        Err("the CA chain is too long".into())
    }
}

fn crl_state_with_cas(current: &CrlState) -> CrlState {
    CrlState { crls: Vec::new(), known_cas: current.known_cas.clone() }
}

/// Puts `loaded` into `next`, refusing it if `current` or `next` holds a newer CRL of
/// the same issuer.
fn install(
    next: &mut CrlState,
    current: &CrlState,
    loaded: Arc<LoadedCrl>,
    new_cas: Vec<CertificateDer<'static>>,
) -> Result<(), VerifyError> {
    for held in current.crls.iter().chain(next.crls.iter()) {
        if held.issuer_der != loaded.issuer_der {
            continue;
        }
        match (&held.info.crl_number, &loaded.info.crl_number) {
            (Some(have), Some(offered)) if numeric_cmp(offered, have) == Ordering::Less => {
                return Err(VerifyError::StaleCrl {
                    issuer: loaded.info.issuer.clone(),
                    loaded: have.to_string(),
                    offered: offered.to_string(),
                });
            }
            _ => {}
        }
    }
    next.crls.retain(|c| c.issuer_der != loaded.issuer_der);
    next.crls.push(loaded);
    for ca in new_cas {
        if !next.known_cas.contains(&ca) {
            next.known_cas.push(ca);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_numbers_compare_numerically() {
        let a: Serial = "ff".parse().unwrap();
        let b: Serial = "0100".parse().unwrap();
        assert_eq!(numeric_cmp(&a, &b), Ordering::Less);
        assert_eq!(numeric_cmp(&b, &b), Ordering::Equal);
    }
}
