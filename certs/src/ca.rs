//! The issuing side: a certificate authority kept in a directory.
//!
//! A CA directory holds:
//!
//! | file | what |
//! |---|---|
//! | `ca.key` | the CA's Ed25519 private key, PKCS#8 PEM, mode 0600 |
//! | `ca.pem` | the CA's certificate |
//! | `chain.pem` | the CA's certificate, then its issuers up to and including the root |
//! | `index.json` | every serial this CA issued, every revocation, the next CRL number |
//! | `.lock` | present while a process uses the directory |
//!
//! [`CertificateAuthority`] creates a root ([`CertificateAuthority::init_root`]), issues
//! intermediates limited to a region and to lower tiers, signs node CSRs after checking
//! region and tier, revokes serials and signs CRLs. Every request is checked against
//! the CA's own constraints *before* signing, so a CA built with this module never
//! issues what a verifier would reject; the verifier ([`crate::verify`]) still checks
//! everything on its own, because certificates can be forged with other tools.
//!
//! This module must never overwrite a key or CA file, never sign a CSR whose
//! signature does not verify, and never copy a CSR's extensions into a certificate.

use crate::enrol;
use crate::error::CaError;
use crate::keys::{self, RawEd25519};
use crate::profile::{self, CertSummary, Serial};
use federation_proto::{NodeName, Tier};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CHAIN_FILE: &str = "chain.pem";
pub const INDEX_FILE: &str = "index.json";
pub const LOCK_FILE: &str = ".lock";
/// Default time until a CRL's nextUpdate.
pub const CRL_VALIDITY_DAYS: u32 = 7;

const INDEX_VERSION: u32 = 1;

/// How long a new certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From a few minutes ago (clock skew allowance) for this many days.
    Days(u32),
    /// An explicit window (used by tests and for back-dated re-issuance).
    Window { not_before: OffsetDateTime, not_after: OffsetDateTime },
}

impl Validity {
    fn resolve(self, now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
        match self {
            Validity::Days(days) => {
                (now - time::Duration::seconds(profile::BACKDATE_S), now + time::Duration::days(i64::from(days)))
            }
            Validity::Window { not_before, not_after } => (not_before, not_after),
        }
    }
}

/// Why a certificate was revoked (RFC 5280 §5.3.1 reason codes that apply here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RevokeReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
}

impl std::fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            RevokeReason::Unspecified => "unspecified",
            RevokeReason::KeyCompromise => "key-compromise",
            RevokeReason::CaCompromise => "ca-compromise",
            RevokeReason::AffiliationChanged => "affiliation-changed",
            RevokeReason::Superseded => "superseded",
            RevokeReason::CessationOfOperation => "cessation-of-operation",
            RevokeReason::PrivilegeWithdrawn => "privilege-withdrawn",
        };
        f.write_str(name)
    }
}

impl RevokeReason {
    fn to_rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            RevokeReason::Unspecified => R::Unspecified,
            RevokeReason::KeyCompromise => R::KeyCompromise,
            RevokeReason::CaCompromise => R::CaCompromise,
            RevokeReason::AffiliationChanged => R::AffiliationChanged,
            RevokeReason::Superseded => R::Superseded,
            RevokeReason::CessationOfOperation => R::CessationOfOperation,
            RevokeReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
        }
    }
}

/// What kind of certificate an index entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuedKind {
    Node,
    Ca,
}

/// One certificate issued by this CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedEntry {
    pub serial: Serial,
    pub kind: IssuedKind,
    /// Node name, or the sub-CA's region.
    pub name: String,
    pub tier: Tier,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedEntry {
    pub serial: Serial,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    pub reason: RevokeReason,
}

/// The CA's record of what it issued and revoked (`index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub version: u32,
    /// The CRL number the next CRL gets (RFC 5280 §5.2.3: strictly increasing).
    pub next_crl_number: u64,
    pub issued: Vec<IssuedEntry>,
    pub revoked: Vec<RevokedEntry>,
}

impl Index {
    fn new() -> Index {
        Index { version: INDEX_VERSION, next_crl_number: 1, issued: Vec::new(), revoked: Vec::new() }
    }

    fn to_json(&self) -> Result<String, CaError> {
        serde_json::to_string_pretty(self)
            .map(|s| s + "\n")
            .map_err(|source| CaError::Index { path: INDEX_FILE.into(), source })
    }
}

/// Options for a new federation root.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// Federation name, used in the root's common name (`<name> federation root`).
    pub name: String,
    /// Region the whole federation is limited to (`""`: no name constraints).
    pub region: String,
    /// The root's tier claim; `None` (the default) lets it certify every tier.
    pub tier: Option<Tier>,
    pub validity: Validity,
}

impl RootOptions {
    pub fn new(name: impl Into<String>) -> RootOptions {
        RootOptions {
            name: name.into(),
            region: String::new(),
            tier: None,
            validity: Validity::Days(profile::ROOT_VALIDITY_DAYS),
        }
    }
}

/// Options for a new intermediate CA.
#[derive(Debug, Clone)]
pub struct IntermediateOptions {
    /// The region it may issue in; must lie inside the issuing CA's region.
    pub region: String,
    /// Its tier: it may certify only tiers strictly below; must be below the issuer's.
    pub tier: Tier,
    /// Common name; default `<region> <tier> CA <serial prefix>`. CA names must be
    /// unique within the federation.
    pub name: Option<String>,
    pub validity: Validity,
    /// basicConstraints pathLenConstraint; default: as deep as its tier allows,
    /// capped by the issuer's own constraint.
    pub path_len: Option<u8>,
}

impl IntermediateOptions {
    pub fn new(region: impl Into<String>, tier: Tier) -> IntermediateOptions {
        IntermediateOptions {
            region: region.into(),
            tier,
            name: None,
            validity: Validity::Days(profile::INTERMEDIATE_VALIDITY_DAYS),
            path_len: None,
        }
    }
}

/// A node certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub serial: Serial,
    pub name: NodeName,
    pub tier: Tier,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The node certificate alone.
    pub cert_pem: String,
    /// The node certificate followed by the intermediates up to (not including) the
    /// root: what the node presents in TLS. This is what `telemed-ca sign` writes.
    pub chain_pem: String,
}

/// Removes the lock file when the CA is dropped.
#[derive(Debug)]
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, CaError> {
        let path = dir.join(LOCK_FILE);
        match keys::write_public_file(&path, &format!("{}\n", std::process::id())) {
            Ok(()) => Ok(DirLock(path)),
            Err(CaError::AlreadyExists { path }) => Err(CaError::Locked { path }),
            Err(e) => Err(e),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A certificate authority opened from (or created in) its directory. Holds the
/// directory's lock for as long as it lives.
#[derive(Debug)]
pub struct CertificateAuthority {
    dir: PathBuf,
    key: rcgen::KeyPair,
    cert: CertificateDer<'static>,
    summary: CertSummary,
    region: String,
    /// This CA's certificate first, the root last.
    chain: Vec<CertificateDer<'static>>,
    index: Index,
    _lock: DirLock,
}

impl CertificateAuthority {
    /// Creates a federation root in `dir` (created if missing, mode 0700). Refuses if
    /// any CA file already exists there.
    pub fn init_root(dir: &Path, options: &RootOptions) -> Result<CertificateAuthority, CaError> {
        let region = profile::parse_region(&options.region)?;
        if options.name.trim().is_empty() {
            return Err(CaError::InvalidCaDir { dir: dir.to_owned(), reason: "the federation name is empty".into() });
        }
        let lock = prepare_new_ca_dir(dir)?;
        let key = keys::generate_key_pair()?;
        let now = now_utc();
        let (not_before, not_after) = options.validity.resolve(now);
        if not_after <= now {
            return Err(CaError::InvalidRequest { reason: "the root's validity period is empty".into() });
        }
        let mut params = ca_params(
            &format!("{} federation root", options.name.trim()),
            &region,
            options.tier,
            rcgen::BasicConstraints::Unconstrained,
            not_before,
            not_after,
        )?;
        params.use_authority_key_identifier_extension = false;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        write_ca_files(dir, &key, &pem, &pem)?;
        Self::from_parts(dir, key, cert.der().clone(), vec![cert.der().clone()], Index::new(), lock)
    }

    /// Opens an existing CA directory and takes its lock.
    pub fn open(dir: &Path) -> Result<CertificateAuthority, CaError> {
        let lock = DirLock::acquire(dir).map_err(|e| match e {
            CaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                CaError::InvalidCaDir { dir: dir.to_owned(), reason: "no such directory".into() }
            }
            e => e,
        })?;
        let key = keys::key_pair_from_pem(&keys::read_to_string(&dir.join(CA_KEY_FILE))?)?;
        let cert_pem = keys::read_to_string(&dir.join(CA_CERT_FILE))?;
        let cert = profile::pem_certificates(&cert_pem)?.remove(0);
        let chain = profile::pem_certificates(&keys::read_to_string(&dir.join(CHAIN_FILE))?)?;
        let index_path = dir.join(INDEX_FILE);
        let index: Index = serde_json::from_str(&keys::read_to_string(&index_path)?)
            .map_err(|source| CaError::Index { path: index_path.clone(), source })?;
        if index.version != INDEX_VERSION {
            return Err(CaError::InvalidCaDir {
                dir: dir.to_owned(),
                reason: format!("index.json version {} is not supported", index.version),
            });
        }
        Self::from_parts(dir, key, cert, chain, index, lock)
    }

    fn from_parts(
        dir: &Path,
        key: rcgen::KeyPair,
        cert: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        index: Index,
        lock: DirLock,
    ) -> Result<CertificateAuthority, CaError> {
        let bad = |reason: String| CaError::InvalidCaDir { dir: dir.to_owned(), reason };
        let summary = CertSummary::from_der(&cert)?;
        if !summary.is_ca {
            return Err(bad("ca.pem is not a CA certificate (basicConstraints cA is not set)".into()));
        }
        if summary.public_key != Some(keys::public_key_of(&key)?) {
            return Err(bad("ca.key does not match ca.pem".into()));
        }
        if chain.first() != Some(&cert) {
            return Err(bad("chain.pem does not start with ca.pem".into()));
        }
        let region = summary.ca_region()?;
        Ok(CertificateAuthority { dir: dir.to_owned(), key, cert, summary, region, chain, index, _lock: lock })
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's tier claim (`None` for an unlimited root).
    pub fn tier(&self) -> Option<Tier> {
        self.summary.tier
    }

    /// The region the CA may issue in (`""`: everywhere).
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The CA's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        profile::to_pem("CERTIFICATE", &self.cert)
    }

    /// The federation root certificate (last of the chain), as PEM: what every node
    /// needs in its trust store.
    pub fn root_pem(&self) -> String {
        let root = self.chain.last().unwrap_or(&self.cert);
        profile::to_pem("CERTIFICATE", root)
    }

    /// What the CA parsed from its own certificate.
    pub fn summary(&self) -> &CertSummary {
        &self.summary
    }

    /// The index of issued and revoked serials.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Issues an intermediate CA into `out_dir` (its key is generated there, mode
    /// 0600). Checks that its region lies inside this CA's region, that its tier is
    /// below this CA's tier, and that this CA may still issue CAs (path length).
    pub fn issue_intermediate(
        &mut self,
        out_dir: &Path,
        options: &IntermediateOptions,
    ) -> Result<CertificateAuthority, CaError> {
        let region = profile::parse_region(&options.region)?;
        if region.is_empty() {
            return Err(CaError::InvalidName(profile::NameError {
                kind: "region",
                name: String::new(),
                reason: "an intermediate CA must be limited to a region",
            }));
        }
        if !NodeName::new(region.as_str()).is_within(&self.region) {
            return Err(CaError::OutsideRegion { name: region, region: self.region.clone() });
        }
        self.check_tier_below(options.tier)?;
        if options.tier <= Tier::Village {
            return Err(CaError::TierTooLowForCa { tier: options.tier });
        }
        // Deepest useful chain below a CA of tier t: sub-CAs of tiers t-1 .. township.
        let tier_depth = options.tier.level().saturating_sub(1);
        let issuer_cap = match self.summary.path_len {
            Some(0) => return Err(CaError::PathLenExhausted),
            Some(n) => Some(u8::try_from(n - 1).unwrap_or(u8::MAX)),
            None => None,
        };
        let mut path_len = options.path_len.unwrap_or(tier_depth).min(tier_depth);
        if let Some(cap) = issuer_cap {
            path_len = path_len.min(cap);
        }
        let now = now_utc();
        let (not_before, not_after) = self.clamp_validity(options.validity, now)?;

        let lock = prepare_new_ca_dir(out_dir)?;
        let key = keys::generate_key_pair()?;
        let serial = Serial::random()?;
        // Issuer names must be unique for path building and CRL matching: the default
        // name carries the start of the serial, so a re-issued CA gets a new name.
        let name = options.name.clone().unwrap_or_else(|| {
            let tag: String = serial.to_string().chars().take(8).collect();
            format!("{region} {} CA {tag}", options.tier)
        });
        let mut params = ca_params(
            &name,
            &region,
            Some(options.tier),
            rcgen::BasicConstraints::Constrained(path_len),
            not_before,
            not_after,
        )?;
        params.serial_number = Some(serial.to_rcgen());
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        let mut chain_pem = cert.pem();
        for c in &self.chain {
            chain_pem.push_str(&profile::to_pem("CERTIFICATE", c));
        }
        self.record(IssuedEntry {
            serial,
            kind: IssuedKind::Ca,
            name: region,
            tier: options.tier,
            not_before,
            not_after,
            issued_at: now,
        })?;
        write_ca_files(out_dir, &key, &cert.pem(), &chain_pem)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Self::from_parts(out_dir, key, cert.der().clone(), chain, Index::new(), lock)
    }

    /// Signs a node's CSR for `tier`. The CSR's signature is verified; the name must lie
    /// inside this CA's region; `tier` must be below this CA's tier and equal to the
    /// tier the CSR asks for (if it asks). Nothing else from the CSR is used.
    pub fn sign_csr(&mut self, csr_pem: &str, tier: Tier, validity: Validity) -> Result<IssuedCert, CaError> {
        let request = enrol::parse_csr(csr_pem)?;
        match request.requested_tier {
            Some(in_csr) if in_csr != tier => {
                return Err(CaError::TierMismatch { in_csr, approved: tier });
            }
            _ => {}
        }
        if !request.name.is_within(&self.region) {
            return Err(CaError::OutsideRegion { name: request.name.to_string(), region: self.region.clone() });
        }
        self.check_tier_below(tier)?;
        let now = now_utc();
        let (not_before, not_after) = self.clamp_validity(validity, now)?;
        let serial = Serial::random()?;
        let params = node_params(&request.name, tier, &serial, not_before, not_after)?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let cert = params.signed_by(&RawEd25519(request.public_key.0), &issuer)?;
        self.record(IssuedEntry {
            serial: serial.clone(),
            kind: IssuedKind::Node,
            name: request.name.to_string(),
            tier,
            not_before,
            not_after,
            issued_at: now,
        })?;
        let cert_pem = cert.pem();
        let mut chain_pem = cert_pem.clone();
        for c in self.intermediates() {
            chain_pem.push_str(&profile::to_pem("CERTIFICATE", c));
        }
        Ok(IssuedCert { serial, name: request.name, tier, not_before, not_after, cert_pem, chain_pem })
    }

    /// Records the revocation of a serial this CA issued. Takes effect for verifiers
    /// once they load the next CRL ([`CertificateAuthority::crl`]).
    pub fn revoke(&mut self, serial: &Serial, reason: RevokeReason) -> Result<(), CaError> {
        if !self.index.issued.iter().any(|e| e.serial == *serial) {
            return Err(CaError::UnknownSerial { serial: serial.clone() });
        }
        if self.index.revoked.iter().any(|e| e.serial == *serial) {
            return Err(CaError::AlreadyRevoked { serial: serial.clone() });
        }
        let mut index = self.index.clone();
        index.revoked.push(RevokedEntry { serial: serial.clone(), revoked_at: now_utc(), reason });
        self.save_index(index)
    }

    /// Signs a CRL of every revocation so far, valid for `next_update_days`, and
    /// returns it as PEM followed by this CA's certificate chain without the root
    /// (so a verifier that only has the root can authenticate the CRL's signer).
    pub fn crl(&mut self, next_update_days: u32) -> Result<String, CaError> {
        if next_update_days == 0 {
            return Err(CaError::InvalidRequest { reason: "a CRL's next update must be at least one day away".into() });
        }
        let now = now_utc();
        let number = self.index.next_crl_number;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(i64::from(next_update_days)),
            crl_number: Serial::from_der_integer(&number.to_be_bytes()).to_rcgen(),
            issuing_distribution_point: None,
            revoked_certs: self
                .index
                .revoked
                .iter()
                .map(|r| rcgen::RevokedCertParams {
                    serial_number: r.serial.to_rcgen(),
                    revocation_time: r.revoked_at,
                    reason_code: Some(r.reason.to_rcgen()),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let crl = params.signed_by(&issuer)?;
        let mut out = crl.pem()?;
        for c in self.chain.iter().take(self.chain.len().saturating_sub(1)) {
            out.push_str(&profile::to_pem("CERTIFICATE", c));
        }
        let mut index = self.index.clone();
        index.next_crl_number = number + 1;
        self.save_index(index)?;
        Ok(out)
    }

    /// The intermediates a certificate issued by this CA needs: this CA and its
    /// issuers, without the root. Empty for the root.
    fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[..self.chain.len().saturating_sub(1)]
    }

    fn check_tier_below(&self, tier: Tier) -> Result<(), CaError> {
        match self.summary.tier {
            Some(ca_tier) if tier >= ca_tier => Err(CaError::TierNotBelowIssuer { requested: tier, ca_tier }),
            _ => Ok(()),
        }
    }

    /// Resolves a validity and clamps it into this CA's own validity.
    fn clamp_validity(
        &self,
        validity: Validity,
        now: OffsetDateTime,
    ) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
        let ca_not_before = OffsetDateTime::from_unix_timestamp(self.summary.not_before_s)
            .map_err(|_| profile::MalformedError::new("CA certificate", "notBefore out of range"))?;
        let ca_not_after = OffsetDateTime::from_unix_timestamp(self.summary.not_after_s)
            .map_err(|_| profile::MalformedError::new("CA certificate", "notAfter out of range"))?;
        if now < ca_not_before || now > ca_not_after {
            return Err(CaError::CaNotValidNow {
                not_before: profile::format_time_s(self.summary.not_before_s),
                not_after: profile::format_time_s(self.summary.not_after_s),
            });
        }
        let (not_before, not_after) = validity.resolve(now);
        if not_after <= not_before || validity == Validity::Days(0) {
            return Err(CaError::InvalidRequest { reason: "the validity period is empty".into() });
        }
        // Explicit windows are taken as given (tests build expired certificates);
        // computed ones never outlive the CA.
        match validity {
            Validity::Days(_) => Ok((not_before.max(ca_not_before), not_after.min(ca_not_after))),
            Validity::Window { .. } => Ok((not_before, not_after)),
        }
    }

    fn record(&mut self, entry: IssuedEntry) -> Result<(), CaError> {
        let mut index = self.index.clone();
        index.issued.push(entry);
        self.save_index(index)
    }

    /// Writes the index first, then adopts it, so memory never runs ahead of disk.
    fn save_index(&mut self, index: Index) -> Result<(), CaError> {
        keys::replace_file(&self.dir.join(INDEX_FILE), &index.to_json()?)?;
        self.index = index;
        Ok(())
    }
}

/// The current time, truncated to whole seconds (what certificates can express).
fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Creates the directory if needed, takes its lock, and checks no CA file exists.
fn prepare_new_ca_dir(dir: &Path) -> Result<DirLock, CaError> {
    keys::create_private_dir(dir)?;
    let lock = DirLock::acquire(dir)?;
    for file in [CA_KEY_FILE, CA_CERT_FILE, CHAIN_FILE, INDEX_FILE] {
        let path = dir.join(file);
        if path.exists() {
            return Err(CaError::AlreadyExists { path });
        }
    }
    Ok(lock)
}

/// Writes a new CA's files; the key first, with create-new semantics.
fn write_ca_files(dir: &Path, key: &rcgen::KeyPair, cert_pem: &str, chain_pem: &str) -> Result<(), CaError> {
    keys::write_secret_file(&dir.join(CA_KEY_FILE), &key.serialize_pem())?;
    keys::write_public_file(&dir.join(CA_CERT_FILE), cert_pem)?;
    keys::write_public_file(&dir.join(CHAIN_FILE), chain_pem)?;
    keys::write_public_file(&dir.join(INDEX_FILE), &Index::new().to_json()?)
}

fn tier_extension(tier: Tier) -> rcgen::CustomExtension {
    let mut ext =
        rcgen::CustomExtension::from_oid_content(profile::TIER_EXTENSION_OID_ARCS, profile::encode_tier(tier));
    ext.set_criticality(false);
    ext
}

/// The profile of a CA certificate.
fn ca_params(
    common_name: &str,
    region: &str,
    tier: Option<Tier>,
    constraints: rcgen::BasicConstraints,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<rcgen::CertificateParams, CaError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(Serial::random()?.to_rcgen());
    params.is_ca = rcgen::IsCa::Ca(constraints);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    if !region.is_empty() {
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(region.to_owned())],
            excluded_subtrees: Vec::new(),
        });
    }
    if let Some(tier) = tier {
        params.custom_extensions.push(tier_extension(tier));
    }
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The profile of a node certificate. Public so tests and tools can build
/// certificates with the exact production profile.
pub fn node_params(
    name: &NodeName,
    tier: Tier,
    serial: &Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<rcgen::CertificateParams, CaError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name.as_str());
    params.subject_alt_names = vec![rcgen::SanType::DnsName(name.as_str().try_into()?)];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial.to_rcgen());
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.custom_extensions.push(tier_extension(tier));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(name: &str, tier: Tier) -> String {
        enrol::generate_key_and_csr(&NodeName::from(name), tier).unwrap().1
    }

    #[test]
    fn root_and_intermediate_carry_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new("cn")).unwrap();
        assert_eq!(root.tier(), None);
        assert_eq!(root.region(), "");
        let national =
            root.issue_intermediate(&dir.path().join("nat"), &IntermediateOptions::new("cn", Tier::National)).unwrap();
        let s = national.summary();
        assert!(s.is_ca);
        assert_eq!(s.tier, Some(Tier::National));
        assert!(!s.tier_critical);
        assert_eq!(s.permitted_dns, vec!["cn".to_owned()]);
        assert_eq!(s.path_len, Some(4));
        assert_eq!(s.key_usage, vec!["keyCertSign", "cRLSign"]);
        assert_eq!(root.index().issued.len(), 1);
        assert_eq!(root.index().issued[0].kind, IssuedKind::Ca);
    }

    #[test]
    fn node_certificate_carries_name_tier_key_and_usages() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap();
        let issued = root.sign_csr(&csr("henan.cn", Tier::Provincial), Tier::Provincial, Validity::Days(30)).unwrap();
        let der = profile::pem_certificates(&issued.cert_pem).unwrap().remove(0);
        let s = CertSummary::from_der(&der).unwrap();
        assert_eq!(s.dns_names, vec!["henan.cn".to_owned()]);
        assert_eq!(s.common_name.as_deref(), Some("henan.cn"));
        assert_eq!(s.tier, Some(Tier::Provincial));
        assert!(!s.is_ca);
        assert!(s.eku_server_auth && s.eku_client_auth);
        assert_eq!(s.key_usage, vec!["digitalSignature"]);
        assert_eq!(s.serial, issued.serial);
        assert!(s.public_key.is_some());
        // Signed by the root directly: nothing but the leaf to present.
        assert_eq!(profile::pem_certificates(&issued.chain_pem).unwrap().len(), 1);
    }

    #[test]
    fn csr_tier_must_match_the_approved_tier() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap();
        let err = root.sign_csr(&csr("a.henan.cn", Tier::Village), Tier::County, Validity::Days(1)).unwrap_err();
        assert!(matches!(err, CaError::TierMismatch { in_csr: Tier::Village, approved: Tier::County }));
    }

    #[test]
    fn intermediates_must_nest_in_region_tier_and_path_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new("cn")).unwrap();
        let mut prov = root
            .issue_intermediate(&dir.path().join("henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))
            .unwrap();
        let err = prov
            .issue_intermediate(&dir.path().join("x"), &IntermediateOptions::new("hubei.cn", Tier::City))
            .unwrap_err();
        assert!(matches!(err, CaError::OutsideRegion { .. }), "{err}");
        let err = prov
            .issue_intermediate(&dir.path().join("y"), &IntermediateOptions::new("zz.henan.cn", Tier::Provincial))
            .unwrap_err();
        assert!(matches!(err, CaError::TierNotBelowIssuer { .. }), "{err}");
        let mut township = prov
            .issue_intermediate(&dir.path().join("t"), &IntermediateOptions::new("g.zz.henan.cn", Tier::Township))
            .unwrap();
        assert_eq!(township.summary().path_len, Some(0));
        let err = township
            .issue_intermediate(&dir.path().join("v"), &IntermediateOptions::new("v.g.zz.henan.cn", Tier::Village))
            .unwrap_err();
        assert!(matches!(err, CaError::TierTooLowForCa { .. } | CaError::PathLenExhausted), "{err}");
    }

    #[test]
    fn a_locked_ca_directory_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let root = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap();
        assert!(matches!(CertificateAuthority::open(dir.path()), Err(CaError::Locked { .. })));
        drop(root);
        assert!(CertificateAuthority::open(dir.path()).is_ok());
    }

    #[test]
    fn revoke_refuses_unknown_and_repeated_serials_and_crl_numbers_increase() {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap();
        let issued = root.sign_csr(&csr("a.cn", Tier::Provincial), Tier::Provincial, Validity::Days(1)).unwrap();
        let unknown: Serial = "0102".parse().unwrap();
        assert!(matches!(root.revoke(&unknown, RevokeReason::Unspecified), Err(CaError::UnknownSerial { .. })));
        root.revoke(&issued.serial, RevokeReason::KeyCompromise).unwrap();
        assert!(matches!(
            root.revoke(&issued.serial, RevokeReason::KeyCompromise),
            Err(CaError::AlreadyRevoked { .. })
        ));
        root.crl(7).unwrap();
        root.crl(7).unwrap();
        drop(root);
        let reopened = CertificateAuthority::open(dir.path()).unwrap();
        assert_eq!(reopened.index().next_crl_number, 3);
        assert_eq!(reopened.index().revoked.len(), 1);
    }
}
