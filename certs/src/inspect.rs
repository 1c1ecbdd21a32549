//! Human-readable reports of what certificates, CSRs and CRLs claim.
//!
//! `telemed-ca inspect` prints these. A report says what a file *claims*; it does not
//! say whether the claims are trusted (that needs a [`crate::verify::TrustStore`]), and
//! this module must never present a claim as verified. It only checks what it can
//! check alone: a CSR's self-signature.

use crate::enrol;
use crate::error::CaError;
use crate::keys;
use crate::profile::{self, CertSummary, MalformedError, Serial};
use federation_proto::{NodeName, Tier};
use rustls_pki_types::pem::SectionKind;
use std::fmt::Write;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// Describes every certificate, CSR and CRL section in PEM text, at time `now_s`
/// (seconds since the epoch, for "expired" / "days left").
pub fn inspect_pem(text: &str, now_s: i64) -> Result<String, CaError> {
    let sections = profile::pem_sections(text)?;
    let total = sections.len();
    let mut out = String::new();
    for (i, (kind, der)) in sections.into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let heading = if total > 1 { format!(" ({} of {total})", i + 1) } else { String::new() };
        match kind {
            SectionKind::Certificate => {
                let _ = writeln!(out, "certificate{heading}");
                out.push_str(&describe_certificate(&CertSummary::from_der(&der)?, now_s));
            }
            SectionKind::Csr => {
                let _ = writeln!(out, "certificate signing request{heading}");
                out.push_str(&describe_csr(&der)?);
            }
            SectionKind::Crl => {
                let _ = writeln!(out, "certificate revocation list{heading}");
                out.push_str(&describe_crl(&der, now_s)?);
            }
            SectionKind::PrivateKey => {
                let _ = writeln!(out, "private key{heading}: not shown");
            }
            other => {
                let _ = writeln!(out, "{other:?}{heading}: not a federation PKI object");
            }
        }
    }
    Ok(out)
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {label:<16}{value}");
}

fn tier_text(tier: Option<Tier>, is_ca: bool) -> String {
    match (tier, is_ca) {
        (Some(t), false) => format!("{t} (level {})", t.level()),
        (Some(t), true) => format!("{t} (level {}): may certify tiers below {t}", t.level()),
        (None, true) => "none: may certify every tier (root only)".to_owned(),
        (None, false) => "MISSING: verifiers will reject this node certificate".to_owned(),
    }
}

fn validity_text(s: &CertSummary, now_s: i64) -> String {
    let state = if now_s < s.not_before_s {
        "NOT YET VALID".to_owned()
    } else if now_s > s.not_after_s {
        "EXPIRED".to_owned()
    } else {
        format!("valid now, {} days left", (s.not_after_s - now_s) / 86_400)
    };
    format!("{} .. {} ({state})", profile::format_time_s(s.not_before_s), profile::format_time_s(s.not_after_s))
}

/// A report of one certificate.
pub fn describe_certificate(s: &CertSummary, now_s: i64) -> String {
    let mut out = String::new();
    let kind = match (s.is_ca, s.self_issued) {
        (true, true) => "root CA",
        (true, false) => "intermediate CA",
        (false, _) => "node",
    };
    line(&mut out, "kind:", kind);
    line(&mut out, "subject:", &s.subject);
    if !s.is_ca {
        let names = if s.dns_names.is_empty() { "(none)".to_owned() } else { s.dns_names.join(", ") };
        line(&mut out, "name:", &names);
        if let [one] = s.dns_names.as_slice() {
            line(&mut out, "region:", display_region(profile::region_of(&NodeName::from(one.as_str()))));
        }
    }
    line(&mut out, "tier:", tier_text(s.tier, s.is_ca));
    if s.is_ca {
        let region = match s.permitted_dns.as_slice() {
            [] => "whole federation (no name constraints)".to_owned(),
            names => format!("{} (X.509 name constraints, permitted dNSName)", names.join(", ")),
        };
        line(&mut out, "region:", region);
        if !s.excluded_dns.is_empty() {
            line(&mut out, "excluded:", s.excluded_dns.join(", "));
        }
        let path = match s.path_len {
            Some(n) => format!("yes, at most {n} CA level(s) below it"),
            None => "yes, path length unconstrained".to_owned(),
        };
        line(&mut out, "CA:", path);
    } else {
        line(&mut out, "CA:", "no");
    }
    line(&mut out, "issuer:", &s.issuer);
    line(&mut out, "serial:", &s.serial);
    line(&mut out, "validity:", validity_text(s, now_s));
    match &s.public_key {
        Some(key) => {
            line(&mut out, "key:", format!("ed25519 {key}"));
            match keys::peer_id_of(key) {
                Ok(peer_id) => line(&mut out, "libp2p peer id:", peer_id),
                Err(e) => line(&mut out, "libp2p peer id:", format!("(none: {e})")),
            }
        }
        None => line(&mut out, "key:", format!("{} (NOT Ed25519: outside the profile)", s.key_algorithm)),
    }
    let ku = if s.key_usage.is_empty() { "(none)".to_owned() } else { s.key_usage.join(", ") };
    line(&mut out, "key usage:", ku);
    if !s.is_ca {
        let mut eku = Vec::new();
        if s.eku_server_auth {
            eku.push("serverAuth");
        }
        if s.eku_client_auth {
            eku.push("clientAuth");
        }
        line(&mut out, "ext. key usage:", if eku.is_empty() { "(none)".to_owned() } else { eku.join(", ") });
    }
    out
}

fn display_region(region: &str) -> String {
    if region.is_empty() { "(whole federation)".to_owned() } else { region.to_owned() }
}

/// A report of one CSR (its self-signature is verified).
pub fn describe_csr(der: &[u8]) -> Result<String, CaError> {
    let req = enrol::parse_csr_der(der)?;
    let mut out = String::new();
    line(&mut out, "name:", &req.name);
    line(&mut out, "region:", display_region(profile::region_of(&req.name)));
    line(
        &mut out,
        "requested tier:",
        req.requested_tier.map_or("(none: the CA decides)".to_owned(), |t| t.to_string()),
    );
    line(&mut out, "key:", format!("ed25519 {}", req.public_key));
    line(&mut out, "libp2p peer id:", keys::peer_id_of(&req.public_key)?);
    line(&mut out, "signature:", "valid (proves possession of the key)");
    Ok(out)
}

/// A report of one CRL (its signature is *not* checked here: that needs the issuer).
pub fn describe_crl(der: &[u8], now_s: i64) -> Result<String, CaError> {
    let (_, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| MalformedError::new("CRL", format!("not a valid DER CRL: {e}")))?;
    let mut out = String::new();
    line(&mut out, "issuer:", crl.issuer());
    if let Some(n) = crl.crl_number() {
        line(&mut out, "CRL number:", n);
    }
    line(&mut out, "this update:", profile::format_time_s(crl.last_update().timestamp()));
    match crl.next_update() {
        Some(t) => {
            let state = if t.timestamp() < now_s { " (OVERDUE)" } else { "" };
            line(&mut out, "next update:", format!("{}{state}", profile::format_time_s(t.timestamp())));
        }
        None => line(&mut out, "next update:", "(none)"),
    }
    let revoked: Vec<_> = crl.iter_revoked_certificates().collect();
    line(&mut out, "revoked:", revoked.len());
    for r in revoked {
        let reason = r.reason_code().map_or(String::new(), |(_, code)| format!(" ({code})"));
        let _ = writeln!(
            out,
            "    {} since {}{reason}",
            Serial::from_der_integer(r.raw_serial()),
            profile::format_time_s(r.revocation_date.timestamp())
        );
    }
    Ok(out)
}
