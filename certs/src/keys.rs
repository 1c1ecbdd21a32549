//! Ed25519 keys and the files that hold keys and certificates.
//!
//! One key per node: the same Ed25519 key is in the node's certificate (TLS), signs
//! its manifests, receipts and reports (`ed25519-dalek`), and is its libp2p identity.
//! This module generates such keys, converts between the three forms and derives the
//! PeerId, and writes files carefully: private keys are created with mode 0600, and
//! no key, certificate or CA file is ever overwritten.
//!
//! It must never write a private key to a file that already exists, never widen a
//! key file's permissions, and never log key material.

use crate::error::CaError;
use crate::profile::{self, MalformedError};
use federation_proto::PublicKey;
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Generates a fresh Ed25519 key pair (system RNG).
pub fn generate_key_pair() -> Result<rcgen::KeyPair, CaError> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
}

/// Loads a PKCS#8 PEM private key and checks that it is Ed25519.
pub fn key_pair_from_pem(pem: &str) -> Result<rcgen::KeyPair, CaError> {
    let key = rcgen::KeyPair::from_pem(pem)
        .map_err(|e| CaError::InvalidKey { reason: format!("not a PKCS#8 private key: {e}") })?;
    if key.algorithm() != &rcgen::PKCS_ED25519 {
        return Err(CaError::InvalidKey {
            reason: "not an Ed25519 key: the federation profile uses Ed25519 only".into(),
        });
    }
    Ok(key)
}

/// The public half of an Ed25519 key pair.
pub fn public_key_of(key: &rcgen::KeyPair) -> Result<PublicKey, CaError> {
    let raw: [u8; 32] = key
        .public_key_raw()
        .try_into()
        .map_err(|_| CaError::InvalidKey { reason: "Ed25519 public key is not 32 bytes".into() })?;
    Ok(PublicKey(raw))
}

/// Loads the node's PEM private key as an `ed25519-dalek` signing key, for signing
/// manifests, receipts and reports with the same key as its certificate.
pub fn signing_key_from_pem(pem: &str) -> Result<ed25519_dalek::SigningKey, CaError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let key = key_pair_from_pem(pem)?;
    ed25519_dalek::SigningKey::from_pkcs8_der(key.serialized_der())
        .map_err(|e| CaError::InvalidKey { reason: format!("PKCS#8 Ed25519 key: {e}") })
}

/// The libp2p PeerId (base58) of an Ed25519 public key: what a libp2p peer holding the
/// same key presents, so a PeerId can be checked against a certificate.
pub fn peer_id_of(key: &PublicKey) -> Result<String, MalformedError> {
    let ed = libp2p_identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| MalformedError::new("Ed25519 public key", e.to_string()))?;
    Ok(libp2p_identity::PublicKey::from(ed).to_peer_id().to_base58())
}

/// An Ed25519 public key as rcgen wants it when a CA signs someone else's key.
pub(crate) struct RawEd25519(pub [u8; 32]);

impl rcgen::PublicKeyData for RawEd25519 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A node's certificate chain and private key, checked to belong together, in the
/// types rustls wants.
#[derive(Debug)]
pub struct NodeCredentials {
    /// The node certificate first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// The key's public half, equal to the certificate's.
    pub public_key: PublicKey,
}

impl NodeCredentials {
    /// From PEM text: `chain_pem` as written by `telemed-ca sign`, `key_pem` as written
    /// by keygen. Fails if the key is not the certificate's.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<NodeCredentials, CaError> {
        let chain = profile::pem_certificates(chain_pem)?;
        let leaf = profile::CertSummary::from_der(&chain[0])?;
        let cert_key = leaf.public_key.ok_or_else(|| CaError::InvalidKey {
            reason: format!("certificate `{}` does not hold an Ed25519 key", leaf.label()),
        })?;
        let key = key_pair_from_pem(key_pem)?;
        let public_key = public_key_of(&key)?;
        if public_key != cert_key {
            return Err(CaError::InvalidKey {
                reason: format!(
                    "the private key (public half {public_key}) does not match certificate `{}` (key {cert_key})",
                    leaf.label()
                ),
            });
        }
        let pkcs8 = profile::pem_sections(key_pem)?
            .into_iter()
            .find(|(kind, _)| *kind == SectionKind::PrivateKey)
            .map(|(_, der)| der)
            .ok_or_else(|| CaError::InvalidKey { reason: "no PRIVATE KEY (PKCS#8) section".into() })?;
        Ok(NodeCredentials { chain, key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)), public_key })
    }

    /// Reads the chain and key files.
    pub fn load(chain_path: &Path, key_path: &Path) -> Result<NodeCredentials, CaError> {
        Self::from_pem(&read_to_string(chain_path)?, &read_to_string(key_path)?)
    }
}

/// Reads a whole text file.
pub fn read_to_string(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::io("reading", path, e))
}

/// Writes a private key (or other secret) to a new file with mode 0600.
/// Fails with [`CaError::AlreadyExists`] if the file exists.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), CaError> {
    write_new(path, contents, 0o600)
}

/// Writes a public file (certificate, CSR) to a new file with mode 0644.
/// Fails with [`CaError::AlreadyExists`] if the file exists.
pub fn write_public_file(path: &Path, contents: &str) -> Result<(), CaError> {
    write_new(path, contents, 0o644)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CaError::AlreadyExists { path: path.to_owned() },
        _ => CaError::io("creating", path, e),
    })?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| CaError::io("writing", path, e))
}

/// Replaces a file's contents atomically (write a temporary file, then rename): for
/// files that are meant to change, such as the CA index and CRLs.
pub fn replace_file(path: &Path, contents: &str) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, contents, 0o644)?;
    std::fs::rename(&tmp, path).map_err(|e| CaError::io("renaming into", path, e))
}

/// Creates a directory (and parents) for CA or node secrets, mode 0700 on Unix.
/// An existing directory is kept as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| CaError::io("creating directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_serves_tls_signing_and_libp2p() {
        use ed25519_dalek::Signer;
        let key = generate_key_pair().unwrap();
        let public = public_key_of(&key).unwrap();
        let signing = signing_key_from_pem(&key.serialize_pem()).unwrap();
        assert_eq!(signing.verifying_key().to_bytes(), public.0);
        let sig = signing.sign(b"manifest");
        assert!(signing.verifying_key().verify_strict(b"manifest", &sig).is_ok());

        let peer_id = peer_id_of(&public).unwrap();
        let mut secret = signing.to_bytes();
        let libp2p_key = libp2p_identity::Keypair::ed25519_from_bytes(&mut secret).unwrap();
        assert_eq!(libp2p_key.public().to_peer_id().to_base58(), peer_id);
    }

    #[test]
    fn non_ed25519_keys_are_refused() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(key_pair_from_pem(&p256.serialize_pem()), Err(CaError::InvalidKey { .. })));
        assert!(key_pair_from_pem("not a key").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_secret_file(&path, "secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(write_secret_file(&path, "other"), Err(CaError::AlreadyExists { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");
    }
}
