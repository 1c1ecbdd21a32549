//! The federation's certificate profile: what a certificate may say and how it is read.
//!
//! This module holds the rules shared by the issuing side ([`crate::ca`]) and the
//! verifying side ([`crate::verify`]): the private tier extension (OID and encoding),
//! the syntax of node names and regions, serial numbers, validity defaults, and
//! [`CertSummary`], a tolerant reading of a certificate for display and for the
//! profile checks that come *after* cryptographic verification.
//!
//! It must never decide whether a certificate is trusted: [`CertSummary`] reads what a
//! certificate claims, whoever signed it. Trust decisions live in [`crate::verify`].

use federation_proto::{NodeName, PublicKey, Tier};
use rustls_pki_types::pem::SectionKind;
use std::fmt;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The tier extension's OID, as dotted text.
///
/// Arc `1.3.6.1.4.1.58888` is a *placeholder* private-enterprise arc: it is not
/// registered with IANA. Before production the project should register a Private
/// Enterprise Number and change this constant (all certificates must then be
/// reissued). Everything that reads or writes the extension goes through this module.
pub const TIER_EXTENSION_OID: &str = "1.3.6.1.4.1.58888.1.1";

/// [`TIER_EXTENSION_OID`] as arcs, for rcgen.
pub const TIER_EXTENSION_OID_ARCS: &[u64] = &[1, 3, 6, 1, 4, 1, 58888, 1, 1];

/// The Ed25519 public-key / signature algorithm OID (RFC 8410).
pub const ED25519_OID: &str = "1.3.101.112";

/// Default validity of a node certificate.
pub const NODE_VALIDITY_DAYS: u32 = 365;
/// Default validity of an intermediate CA certificate (5 years).
pub const INTERMEDIATE_VALIDITY_DAYS: u32 = 5 * 365 + 1;
/// Default validity of a federation root certificate (10 years).
pub const ROOT_VALIDITY_DAYS: u32 = 10 * 365 + 2;
/// How far back `notBefore` is set, to tolerate clocks that run a little slow.
pub const BACKDATE_S: i64 = 5 * 60;
/// Longest accepted DNS-style name (RFC 1035).
pub const NAME_LEN_MAX: usize = 253;
/// Longest accepted label.
pub const LABEL_LEN_MAX: usize = 63;
/// Longest serial number accepted (RFC 5280 §4.1.2.2).
pub const SERIAL_LEN_MAX: usize = 20;

/// A certificate, CSR or CRL that does not follow the profile or cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct MalformedError {
    /// What was being read (e.g. "certificate `x.henan.cn`", "tier extension").
    pub what: String,
    /// Why it was refused.
    pub reason: String,
}

impl MalformedError {
    pub fn new(what: impl Into<String>, reason: impl Into<String>) -> Self {
        MalformedError { what: what.into(), reason: reason.into() }
    }
}

/// A node name or region that is not a valid hierarchical DNS-style name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{name}`: {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub reason: &'static str,
}

/// Encodes a tier claim as the tier extension's value: a DER INTEGER holding
/// [`Tier::level`] (0 = village ..= 6 = international).
pub fn encode_tier(tier: Tier) -> Vec<u8> {
    // Levels are < 0x80, so the INTEGER is one content byte, no sign padding.
    vec![0x02, 0x01, tier.level()]
}

/// Decodes the tier extension's value, strictly: exactly a one-byte DER INTEGER naming
/// a known tier.
pub fn decode_tier(value: &[u8]) -> Result<Tier, MalformedError> {
    match value {
        [0x02, 0x01, level] if *level < 0x80 => Tier::from_level(*level)
            .ok_or_else(|| MalformedError::new("tier extension", format!("level {level} names no tier (0..=6)"))),
        _ => Err(MalformedError::new("tier extension", "value is not a one-byte DER INTEGER (expected 02 01 <level>)")),
    }
}

/// Checks a node name: lower-case ASCII letters, digits and `-`, dot-separated labels
/// of 1..=63 characters not starting or ending with `-`, at most 253 characters, most
/// specific label first (`v017.gaocheng.dengfeng.zhengzhou.henan.cn`).
pub fn parse_node_name(name: &str) -> Result<NodeName, NameError> {
    check_dns_name(name, "node name")?;
    Ok(NodeName::new(name))
}

/// Checks a region: the empty string (the whole federation) or a valid name suffix.
pub fn parse_region(region: &str) -> Result<String, NameError> {
    if !region.is_empty() {
        check_dns_name(region, "region")?;
    }
    Ok(region.to_owned())
}

fn check_dns_name(name: &str, kind: &'static str) -> Result<(), NameError> {
    let err = |reason| NameError { kind, name: name.to_owned(), reason };
    if name.is_empty() {
        return Err(err("empty"));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(err("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(err("empty label (leading, trailing or double dot)"));
        }
        if label.len() > LABEL_LEN_MAX {
            return Err(err("a label is longer than 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(err("only lower-case a-z, 0-9, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(err("a label starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The region a node lives in: its name without the first (most specific) label.
/// `v017.gaocheng.henan.cn` lives in `gaocheng.henan.cn`; a one-label name lives in
/// the whole federation (`""`).
pub fn region_of(name: &NodeName) -> &str {
    name.as_str().split_once('.').map_or("", |(_, rest)| rest)
}

/// A certificate serial number: a positive integer of at most 20 octets, kept as its
/// minimal big-endian magnitude and shown as lower-case hex.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A fresh random serial: 16 bytes (127 random bits) from the system RNG.
    pub fn random() -> Result<Serial, MalformedError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| MalformedError::new("serial number", "system RNG failed"))?;
        bytes[0] &= 0x7f; // positive
        bytes[0] |= 0x01; // never shorter than 16 bytes
        Ok(Serial(bytes.to_vec()))
    }

    /// From the content bytes of a DER INTEGER (leading zero octets are dropped).
    pub fn from_der_integer(bytes: &[u8]) -> Serial {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }

    /// The minimal big-endian magnitude.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn to_rcgen(&self) -> rcgen::SerialNumber {
        rcgen::SerialNumber::from_slice(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl std::str::FromStr for Serial {
    type Err = MalformedError;
    /// Accepts hex with optional `:` separators and an optional `0x` prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| MalformedError::new(format!("serial number `{s}`"), reason);
        let trimmed = s.trim();
        let trimmed = trimmed.strip_prefix("0x").unwrap_or(trimmed);
        let mut digits: String = trimmed.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() {
            return Err(err("empty"));
        }
        if digits.len() % 2 == 1 {
            digits.insert(0, '0');
        }
        let bytes = hex::decode(&digits).map_err(|_| err("not hexadecimal"))?;
        let serial = Serial::from_der_integer(&bytes);
        if serial.0.len() > SERIAL_LEN_MAX {
            return Err(err("longer than 20 octets"));
        }
        Ok(serial)
    }
}

impl serde::Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Serial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a certificate claims, read without judging who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject, RFC 4514 style.
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// dNSName entries of the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// The issuer, RFC 4514 style.
    pub issuer: String,
    pub serial: Serial,
    /// Validity, seconds since the Unix epoch.
    pub not_before_s: i64,
    pub not_after_s: i64,
    /// The tier extension, if present.
    pub tier: Option<Tier>,
    /// Whether the tier extension was marked critical (the profile says it must not be).
    pub tier_critical: bool,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
    /// Permitted dNSName subtrees of the name constraints extension.
    pub permitted_dns: Vec<String>,
    /// Excluded dNSName subtrees of the name constraints extension.
    pub excluded_dns: Vec<String>,
    /// The Ed25519 public key, if the key is Ed25519.
    pub public_key: Option<PublicKey>,
    /// The public key algorithm OID, dotted.
    pub key_algorithm: String,
    /// Key usage bits by name (`digitalSignature`, `keyCertSign`, `cRLSign`, ...).
    pub key_usage: Vec<&'static str>,
    pub eku_server_auth: bool,
    pub eku_client_auth: bool,
    /// Whether issuer == subject (a self-issued certificate).
    pub self_issued: bool,
    /// The DER of the subject and issuer names, for matching issuers to subjects.
    pub subject_der: Vec<u8>,
    pub issuer_der: Vec<u8>,
}

impl CertSummary {
    /// Parses a DER certificate. Fails on malformed DER or malformed profile extensions
    /// (a tier extension that does not decode, a duplicated extension).
    pub fn from_der(der: &[u8]) -> Result<CertSummary, MalformedError> {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| MalformedError::new("certificate", format!("not valid DER X.509: {e}")))?;
        if !rest.is_empty() {
            return Err(MalformedError::new("certificate", "trailing bytes after the certificate"));
        }
        Self::from_parsed(&cert)
    }

    pub(crate) fn from_parsed(cert: &X509Certificate<'_>) -> Result<CertSummary, MalformedError> {
        let what = || format!("certificate `{}`", cert.subject());
        let bad = |reason: String| MalformedError::new(what(), reason);

        let common_name = match cert.subject().iter_common_name().next() {
            Some(cn) => Some(cn.as_str().map_err(|_| bad("common name is not a string".into()))?.to_owned()),
            None => None,
        };
        let mut dns_names = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(|e| bad(format!("subjectAltName: {e}")))? {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    dns_names.push((*n).to_owned());
                }
            }
        }
        let (is_ca, path_len) = match cert.basic_constraints().map_err(|e| bad(format!("basicConstraints: {e}")))? {
            Some(bc) => (bc.value.ca, bc.value.path_len_constraint),
            None => (false, None),
        };
        let mut permitted_dns = Vec::new();
        let mut excluded_dns = Vec::new();
        if let Some(nc) = cert.name_constraints().map_err(|e| bad(format!("nameConstraints: {e}")))? {
            for (subtrees, out) in
                [(&nc.value.permitted_subtrees, &mut permitted_dns), (&nc.value.excluded_subtrees, &mut excluded_dns)]
            {
                for subtree in subtrees.iter().flatten() {
                    if let GeneralName::DNSName(n) = subtree.base {
                        out.push(n.to_owned());
                    }
                }
            }
        }
        let mut key_usage = Vec::new();
        if let Some(ku) = cert.key_usage().map_err(|e| bad(format!("keyUsage: {e}")))? {
            let ku = ku.value;
            for (set, name) in [
                (ku.digital_signature(), "digitalSignature"),
                (ku.non_repudiation(), "contentCommitment"),
                (ku.key_encipherment(), "keyEncipherment"),
                (ku.data_encipherment(), "dataEncipherment"),
                (ku.key_agreement(), "keyAgreement"),
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
            ] {
                if set {
                    key_usage.push(name);
                }
            }
        }
        let (eku_server_auth, eku_client_auth) =
            match cert.extended_key_usage().map_err(|e| bad(format!("extendedKeyUsage: {e}")))? {
                Some(eku) => (eku.value.server_auth, eku.value.client_auth),
                None => (false, false),
            };

        let mut tier = None;
        let mut tier_critical = false;
        for ext in cert.extensions() {
            if ext.oid.to_id_string() == TIER_EXTENSION_OID {
                if tier.is_some() {
                    return Err(bad("the tier extension appears twice".into()));
                }
                tier = Some(decode_tier(ext.value).map_err(|e| bad(e.to_string()))?);
                tier_critical = ext.critical;
            }
        }

        let spki = cert.public_key();
        let key_algorithm = spki.algorithm.algorithm.to_id_string();
        let public_key = if key_algorithm == ED25519_OID {
            let raw: [u8; 32] = spki
                .subject_public_key
                .data
                .as_ref()
                .try_into()
                .map_err(|_| bad("Ed25519 public key is not 32 bytes".into()))?;
            Some(PublicKey(raw))
        } else {
            None
        };

        Ok(CertSummary {
            subject: cert.subject().to_string(),
            common_name,
            dns_names,
            issuer: cert.issuer().to_string(),
            serial: Serial::from_der_integer(cert.raw_serial()),
            not_before_s: cert.validity().not_before.timestamp(),
            not_after_s: cert.validity().not_after.timestamp(),
            tier,
            tier_critical,
            is_ca,
            path_len,
            permitted_dns,
            excluded_dns,
            public_key,
            key_algorithm,
            key_usage,
            eku_server_auth,
            eku_client_auth,
            self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
            subject_der: cert.subject().as_raw().to_vec(),
            issuer_der: cert.issuer().as_raw().to_vec(),
        })
    }

    /// The region a CA may issue in: its single permitted dNSName subtree, or `""`
    /// (everywhere) when it has no name constraints.
    pub fn ca_region(&self) -> Result<String, MalformedError> {
        match self.permitted_dns.as_slice() {
            [] => Ok(String::new()),
            [one] => Ok(one.clone()),
            _ => Err(MalformedError::new(
                format!("CA certificate `{}`", self.subject),
                "more than one permitted dNSName subtree; the profile allows one region per CA",
            )),
        }
    }

    /// A short label for messages: the node name if there is one, else the subject.
    pub fn label(&self) -> String {
        match (self.dns_names.first(), &self.common_name) {
            (Some(n), _) => n.clone(),
            (None, Some(cn)) => cn.clone(),
            (None, None) => self.subject.clone(),
        }
    }
}

/// Splits PEM text into its sections, in order. Unknown section kinds are refused.
pub fn pem_sections(text: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, MalformedError> {
    let mut reader = std::io::Cursor::new(text.as_bytes());
    let mut out = Vec::new();
    loop {
        match rustls_pki_types::pem::from_buf(&mut reader) {
            Ok(Some(section)) => out.push(section),
            Ok(None) => break,
            Err(e) => return Err(MalformedError::new("PEM", e.to_string())),
        }
    }
    if out.is_empty() {
        return Err(MalformedError::new("PEM", "no PEM section found"));
    }
    Ok(out)
}

/// All `CERTIFICATE` sections of PEM text, in order.
pub fn pem_certificates(text: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, MalformedError> {
    let certs: Vec<_> = pem_sections(text)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| rustls_pki_types::CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(MalformedError::new("PEM", "no CERTIFICATE section found"));
    }
    Ok(certs)
}

/// Encodes DER as one PEM section (LF line endings).
pub fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(label, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// Formats seconds since the epoch as RFC 3339 UTC, or the raw number if out of range.
pub fn format_time_s(unix_s: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix_s} s since epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_extension_round_trips_every_tier() {
        for tier in Tier::ALL {
            assert_eq!(decode_tier(&encode_tier(tier)).unwrap(), tier);
        }
    }

    #[test]
    fn tier_extension_rejects_non_canonical_values() {
        for bad in [&[][..], &[0x02, 0x01, 7], &[0x02, 0x02, 0, 1], &[0x04, 0x01, 1], &[0x02, 0x01, 0xff]] {
            assert!(decode_tier(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn node_names_follow_dns_label_rules() {
        assert!(parse_node_name("v017.gaocheng.dengfeng.zhengzhou.henan.cn").is_ok());
        assert!(parse_node_name("cn").is_ok());
        for bad in ["", "a..b", ".cn", "cn.", "Henan.cn", "x_y.cn", "-a.cn", "a-.cn", "a b.cn"] {
            assert!(parse_node_name(bad).is_err(), "`{bad}` must be refused");
        }
        assert!(parse_node_name(&"a".repeat(64)).is_err());
        assert!(parse_region("").is_ok());
        assert!(parse_region("henan.cn").is_ok());
    }

    #[test]
    fn region_is_the_name_without_its_first_label() {
        assert_eq!(region_of(&NodeName::from("v017.gaocheng.henan.cn")), "gaocheng.henan.cn");
        assert_eq!(region_of(&NodeName::from("cn")), "");
    }

    #[test]
    fn serials_parse_with_or_without_colons_and_leading_zeros() {
        let a: Serial = "00:1a:2B".parse().unwrap();
        let b: Serial = "1a2b".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "1a2b");
        assert!("zz".parse::<Serial>().is_err());
        assert!("".parse::<Serial>().is_err());
        assert!("ab".repeat(21).parse::<Serial>().is_err());
        let r = Serial::random().unwrap();
        assert_eq!(r.as_bytes().len(), 16);
        assert!(r.as_bytes()[0] < 0x80);
    }

    #[test]
    fn pem_encoding_round_trips_through_the_pem_parser() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 200] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let pem = to_pem("CERTIFICATE", &der);
            if len == 0 {
                continue;
            }
            let sections = pem_sections(&pem).unwrap();
            assert_eq!(sections, vec![(SectionKind::Certificate, der)]);
        }
    }
}
