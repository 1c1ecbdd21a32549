//! Enrolment without moving private keys: the node generates its own key and a
//! certificate signing request (CSR); the CA checks and signs the CSR.
//!
//! A CSR is a *request*: it names the node and the tier it asks for, proves possession
//! of the key by its signature, and nothing more. [`parse_csr`] checks the signature and
//! the profile (Ed25519 key, one valid node name); the CA then decides the tier and the
//! validity itself. This module must never turn anything else a CSR asks for
//! (extensions, CA flags, key usages) into certificate content.

use crate::error::CaError;
use crate::keys;
use crate::profile;
use federation_proto::{NodeName, PublicKey, Tier};
use rustls_pki_types::pem::SectionKind;
use std::path::{Path, PathBuf};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// File name of the node key written by keygen.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the CSR written by keygen.
pub const NODE_CSR_FILE: &str = "node.csr";

/// Generates a fresh Ed25519 key for node `name` and a CSR asking for `tier`.
/// Returns `(key_pem, csr_pem)`: PKCS#8 `PRIVATE KEY` and `CERTIFICATE REQUEST` PEM.
/// The key must be stored by the caller with mode 0600 (see [`write_key_and_csr`]).
pub fn generate_key_and_csr(name: &NodeName, tier: Tier) -> Result<(String, String), CaError> {
    let name = profile::parse_node_name(name.as_str())?;
    let key = keys::generate_key_pair()?;
    let mut params = rcgen::CertificateParams::new(vec![name.as_str().to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name.as_str());
    let mut ext =
        rcgen::CustomExtension::from_oid_content(profile::TIER_EXTENSION_OID_ARCS, profile::encode_tier(tier));
    ext.set_criticality(false);
    params.custom_extensions.push(ext);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Generates a key and CSR and writes them as `dir/node.key` (mode 0600) and
/// `dir/node.csr`. Refuses to overwrite either. Returns the two paths.
pub fn write_key_and_csr(dir: &Path, name: &NodeName, tier: Tier) -> Result<(PathBuf, PathBuf), CaError> {
    let key_path = dir.join(NODE_KEY_FILE);
    let csr_path = dir.join(NODE_CSR_FILE);
    for path in [&key_path, &csr_path] {
        if path.exists() {
            return Err(CaError::AlreadyExists { path: path.clone() });
        }
    }
    let (key_pem, csr_pem) = generate_key_and_csr(name, tier)?;
    keys::create_private_dir(dir)?;
    keys::write_secret_file(&key_path, &key_pem)?;
    keys::write_public_file(&csr_path, &csr_pem)?;
    Ok((key_path, csr_path))
}

/// What a verified CSR asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrRequest {
    /// The node name (subjectAltName dNSName, equal to the CN if one is given).
    pub name: NodeName,
    /// The tier the node asks for, if the CSR carries the tier extension.
    pub requested_tier: Option<Tier>,
    /// The node's Ed25519 public key.
    pub public_key: PublicKey,
}

/// Parses a PEM CSR, verifies its self-signature and checks the profile.
pub fn parse_csr(csr_pem: &str) -> Result<CsrRequest, CaError> {
    let der = profile::pem_sections(csr_pem)?
        .into_iter()
        .find(|(kind, _)| *kind == SectionKind::Csr)
        .map(|(_, der)| der)
        .ok_or_else(|| invalid("no CERTIFICATE REQUEST section in the PEM"))?;
    parse_csr_der(&der)
}

/// As [`parse_csr`], from DER.
pub fn parse_csr_der(der: &[u8]) -> Result<CsrRequest, CaError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| invalid(&format!("not a valid PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the request"));
    }
    let info = &csr.certification_request_info;
    if info.subject_pki.algorithm.algorithm.to_id_string() != profile::ED25519_OID {
        return Err(invalid("the key is not Ed25519: the federation profile uses Ed25519 only"));
    }
    csr.verify_signature().map_err(|e| invalid(&format!("its signature does not verify with its own key ({e})")))?;
    let raw: [u8; 32] = info
        .subject_pki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| invalid("Ed25519 public key is not 32 bytes"))?;

    let mut san_names = Vec::new();
    let mut requested_tier = None;
    for attr in info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            if ext.oid.to_id_string() == profile::TIER_EXTENSION_OID {
                if requested_tier.is_some() {
                    return Err(invalid("the tier extension is requested twice"));
                }
                requested_tier = Some(profile::decode_tier(ext.value)?);
            } else if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for general in &san.general_names {
                    match general {
                        GeneralName::DNSName(n) => san_names.push((*n).to_owned()),
                        _ => return Err(invalid("subjectAltName may only hold the node's dNSName")),
                    }
                }
            }
        }
    }
    let cn = match info.subject.iter_common_name().next() {
        Some(cn) => Some(cn.as_str().map_err(|_| invalid("common name is not a string"))?.to_owned()),
        None => None,
    };
    let name = match (san_names.as_slice(), cn) {
        ([one], None) => one.clone(),
        ([one], Some(cn)) if *one == cn => cn,
        ([one], Some(cn)) => {
            return Err(invalid(&format!("subjectAltName `{one}` and common name `{cn}` differ")));
        }
        ([], Some(cn)) => cn,
        ([], None) => return Err(invalid("it names no node (no dNSName, no common name)")),
        _ => return Err(invalid("more than one dNSName: a node certificate names one node")),
    };
    Ok(CsrRequest { name: profile::parse_node_name(&name)?, requested_tier, public_key: PublicKey(raw) })
}

fn invalid(reason: &str) -> CaError {
    CaError::InvalidCsr { reason: reason.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_csr_round_trips_name_tier_and_key() {
        let name = NodeName::from("v017.gaocheng.henan.cn");
        let (key_pem, csr_pem) = generate_key_and_csr(&name, Tier::Village).unwrap();
        let req = parse_csr(&csr_pem).unwrap();
        assert_eq!(req.name, name);
        assert_eq!(req.requested_tier, Some(Tier::Village));
        let key = keys::key_pair_from_pem(&key_pem).unwrap();
        assert_eq!(req.public_key, keys::public_key_of(&key).unwrap());
    }

    #[test]
    fn csr_with_a_tampered_body_is_refused() {
        let (_, csr_pem) = generate_key_and_csr(&NodeName::from("a.henan.cn"), Tier::County).unwrap();
        let mut der = profile::pem_sections(&csr_pem).unwrap().remove(0).1;
        // Flip a byte of the requested name ("a.henan.cn" -> "b.henan.cn").
        let pos = der.windows(10).position(|w| w == b"a.henan.cn").unwrap();
        der[pos] = b'b';
        assert!(matches!(parse_csr_der(&der), Err(CaError::InvalidCsr { .. })));
    }

    #[test]
    fn csr_with_a_non_ed25519_key_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.henan.cn".to_owned()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        assert!(matches!(parse_csr(&csr.pem().unwrap()), Err(CaError::InvalidCsr { .. })));
    }

    #[test]
    fn invalid_node_names_are_refused_before_generating_keys() {
        assert!(matches!(
            generate_key_and_csr(&NodeName::from("Bad_Name"), Tier::Village),
            Err(CaError::InvalidName(_))
        ));
    }
}
